// The eager CSA op's autograd node in C++ (kernels/csa/node.py builds and loads it).
//
// The forward and the backward launch the Triton kernels that kernels/csa/triton_csa.py compiled and
// bound (kernels.common.launch_keyed) for one set of shapes, dtypes and options: a `Plan` holds their
// CUfunction handles, grids and argument kinds, the layouts of the saved bytes and of the backward's
// temporaries. Same kernels, same arguments, same allocations as the Python autograd.Function path, so the
// results are bitwise equal; what goes is Python: the backward runs on autograd's device thread without
// taking the GIL, and the forward skips the Python Function's entry. At small batches the op is
// host-bound, and that host time is most of the step (profiles/csa.md).
//
// Only the driver's launch and context calls are needed, looked up in the libcuda that torch already loaded, and
// the current stream comes through c10's device-generic interface: the file builds against CPU and CUDA
// builds of torch alike (CI compiles it on a CPU machine).

#include <dlfcn.h>
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How one runtime argument of a Triton kernel is passed (Triton's compiled signature, in parameter order):
// dropped (specialized to a constant), a device pointer, a 32- or 64-bit integer, a 32-bit float.
enum Kind : int64_t { kDropped = 0, kPointer = 1, kInt32 = 2, kInt64 = 3, kFloat32 = 4 };

struct Kernel {
  void* function = nullptr;  // CUfunction, loaded by Triton in the device's primary context
  unsigned grid[3] = {0, 0, 0};
  unsigned threads = 0;
  unsigned shared = 0;   // dynamic shared memory, bytes
  unsigned scratch = 0;  // trailing scratch pointers Triton appends (null: the kernel uses no scratch)
  std::vector<int64_t> kinds;
};

struct Plan {
  Kernel fwd, dq, dkv;
  int64_t T = 0, Tc = 0;
  double qk_scale = 0, scale = 0;
  int64_t saved_bytes = 0, dcl_off = 0, lse_off = 0;    // the forward's saved bytes: dcl, log2-sum-exps
  int64_t temp_bytes = 0, dx_off = 0, delta_off = 0;    // the backward's temporaries: dX, delta
};

// The number of runtime arguments each launch below passes (the Python side reads them as ARG_COUNTS to bind
// the kernels; `launch` checks every call against the bound kinds).
constexpr size_t kFwdArgs = 12, kDqArgs = 18, kDkvArgs = 16;

union Arg {  // one runtime argument before it is packed by its kind
  uint64_t address;
  int64_t integer;
  double real;
};

// The driver entry points the node calls (CUresult is an int, handles are pointers).
struct Driver {
  int (*launch_kernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                       void**);
  int (*ctx_get_current)(void**);
  int (*ctx_set_current)(void*);
  int (*device_get)(int*, int);
  int (*primary_ctx_retain)(void**, int);
};

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "hyla csa node: cannot open libcuda.so.1");
    auto sym = [lib](const char* name) {
      void* f = dlsym(lib, name);
      TORCH_CHECK(f != nullptr, "hyla csa node: libcuda has no ", name);
      return f;
    };
    Driver r;
    r.launch_kernel = reinterpret_cast<decltype(r.launch_kernel)>(sym("cuLaunchKernel"));
    r.ctx_get_current = reinterpret_cast<decltype(r.ctx_get_current)>(sym("cuCtxGetCurrent"));
    r.ctx_set_current = reinterpret_cast<decltype(r.ctx_set_current)>(sym("cuCtxSetCurrent"));
    r.device_get = reinterpret_cast<decltype(r.device_get)>(sym("cuDeviceGet"));
    r.primary_ctx_retain = reinterpret_cast<decltype(r.primary_ctx_retain)>(sym("cuDevicePrimaryCtxRetain"));
    return r;
  }();
  return d;
}

// The driver API launches in the thread's current context. A thread that has made no CUDA runtime call yet (such
// as autograd's device thread when this node's backward is the first work it runs) has none: make the device's
// primary context current there, the one torch and Triton use.
void ensure_context(c10::DeviceIndex index) {
  const Driver& d = driver();
  void* ctx = nullptr;
  TORCH_CHECK(d.ctx_get_current(&ctx) == 0, "hyla csa node: cuCtxGetCurrent failed");
  if (ctx != nullptr) return;
  int device = 0;
  TORCH_CHECK(d.device_get(&device, index) == 0, "hyla csa node: cuDeviceGet failed");
  TORCH_CHECK(d.primary_ctx_retain(&ctx, device) == 0 && d.ctx_set_current(ctx) == 0,
              "hyla csa node: cannot make the primary context current");
}

void launch(const Kernel& k, const std::vector<Arg>& args, void* stream) {
  TORCH_CHECK(args.size() == k.kinds.size(), "hyla csa node: ", args.size(), " arguments for ", k.kinds.size(),
              " kinds");
  std::vector<uint64_t> slots(args.size() + k.scratch, 0);  // 8 bytes each, zero: null scratch pointers
  std::vector<void*> params;
  params.reserve(slots.size());
  for (size_t i = 0; i < args.size(); ++i) {
    void* slot = &slots[params.size()];
    switch (k.kinds[i]) {
      case kDropped:
        continue;
      case kPointer:
        std::memcpy(slot, &args[i].address, 8);
        break;
      case kInt64:
        std::memcpy(slot, &args[i].integer, 8);
        break;
      case kInt32: {
        const auto v = static_cast<int32_t>(args[i].integer);
        std::memcpy(slot, &v, 4);
        break;
      }
      case kFloat32: {
        const auto v = static_cast<float>(args[i].real);
        std::memcpy(slot, &v, 4);
        break;
      }
      default:
        TORCH_CHECK(false, "hyla csa node: unknown argument kind ", k.kinds[i]);
    }
    params.push_back(slot);
  }
  for (unsigned s = 0; s < k.scratch; ++s) params.push_back(&slots[params.size()]);
  const int err = driver().launch_kernel(k.function, k.grid[0], k.grid[1], k.grid[2], k.threads, 1, 1, k.shared,
                                         stream, params.data(), nullptr);
  TORCH_CHECK(err == 0, "hyla csa node: cuLaunchKernel failed (CUresult ", err, ")");
}

void* current_stream(const Tensor& t) {
  return c10::impl::getDeviceGuardImpl(t.device().type())->getStream(t.device()).native_handle();
}

uint64_t address(const Tensor& t) { return reinterpret_cast<uint64_t>(t.data_ptr()); }

Arg ptr(uint64_t v) {
  Arg a;
  a.address = v;
  return a;
}
Arg ptr(const Tensor& t) { return ptr(address(t)); }
Arg integer(int64_t v) {
  Arg a;
  a.integer = v;
  return a;
}
Arg real(double v) {
  Arg a;
  a.real = v;
  return a;
}

// Plans live as long as the process (one per set of shapes), so a node's raw pointer to its plan stays valid.
std::mutex plans_mutex;
std::vector<std::shared_ptr<Plan>> plans;

struct CSANode : public torch::autograd::Function<CSANode> {
  // Inputs contiguous, k, v, kc, vc in q's dtype, 16-byte aligned (csa_attention_triton and _node_apply in
  // kernels/csa/triton_csa.py see to it).
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& kc, const Tensor& vc, const Tensor& blend, const Plan* plan) {
    const Plan& p = *plan;
    c10::DeviceGuard guard(q.device());
    ensure_context(q.device().index());
    Tensor o = torch::empty_like(q);
    Tensor ws = torch::empty({p.saved_bytes}, q.options().dtype(torch::kUInt8));
    const uint64_t base = address(ws);
    launch(p.fwd,
           {ptr(q), ptr(k), ptr(v), ptr(kc), ptr(vc), ptr(blend), ptr(o), ptr(base + p.dcl_off),
            ptr(base + p.lse_off), integer(p.T), integer(p.Tc), real(p.qk_scale)},
           current_stream(q));
    ctx->save_for_backward({q, k, v, kc, vc, blend, o, ws});
    ctx->saved_data["plan"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(plan));
    return {o};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Plan& p = *reinterpret_cast<const Plan*>(static_cast<intptr_t>(ctx->saved_data["plan"].toInt()));
    const variable_list s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &kc = s[3], &vc = s[4], &blend = s[5], &o = s[6], &ws = s[7];
    c10::DeviceGuard guard(q.device());
    ensure_context(q.device().index());
    Tensor dout = grads[0].to(q.scalar_type()).contiguous();
    if (address(dout) % 16 != 0) dout = dout.clone();  // the kernels were specialized on aligned pointers
    void* stream = current_stream(q);
    Tensor dq = torch::empty_like(q), dblend = torch::empty_like(blend);
    Tensor tmp = torch::empty({p.temp_bytes}, q.options().dtype(torch::kUInt8));
    const uint64_t saved = address(ws), temp = address(tmp);
    const Arg T = integer(p.T), Tc = integer(p.Tc), qk_scale = real(p.qk_scale), scale = real(p.scale);
    launch(p.dq,
           {ptr(q), ptr(k), ptr(v), ptr(kc), ptr(vc), ptr(blend), ptr(o), ptr(saved + p.dcl_off), ptr(dout),
            ptr(saved + p.lse_off), ptr(dq), ptr(dblend), ptr(temp + p.dx_off), ptr(temp + p.delta_off), T, Tc,
            qk_scale, scale},
           stream);
    Tensor dk = torch::empty_like(k), dv = torch::empty_like(v);
    Tensor dkc = torch::empty_like(kc), dvc = torch::empty_like(vc);
    launch(p.dkv,
           {ptr(q), ptr(kc), ptr(vc), ptr(k), ptr(v), ptr(temp + p.dx_off), ptr(saved + p.lse_off),
            ptr(temp + p.delta_off), ptr(dkc), ptr(dvc), ptr(dk), ptr(dv), T, Tc, qk_scale, scale},
           stream);
    return {dq, dk, dv, dkc, dvc, dblend, Tensor()};
  }
};

Kernel make_kernel(int64_t function, std::vector<int64_t> grid, int64_t threads, int64_t shared, int64_t scratch,
                   std::vector<int64_t> kinds, size_t n_args) {
  TORCH_CHECK(function != 0, "hyla csa node: null kernel handle");
  TORCH_CHECK(grid.size() == 3 && grid[0] > 0 && grid[1] > 0 && grid[2] > 0, "hyla csa node: bad grid");
  TORCH_CHECK(threads > 0 && threads <= 1024 && shared >= 0 && scratch >= 0, "hyla csa node: bad launch sizes");
  TORCH_CHECK(kinds.size() == n_args, "hyla csa node: expected ", n_args, " argument kinds, got ", kinds.size());
  for (int64_t kind : kinds)
    TORCH_CHECK(kind >= kDropped && kind <= kFloat32, "hyla csa node: unknown argument kind ", kind);
  Kernel k;
  k.function = reinterpret_cast<void*>(static_cast<intptr_t>(function));
  for (int i = 0; i < 3; ++i) k.grid[i] = static_cast<unsigned>(grid[i]);
  k.threads = static_cast<unsigned>(threads);
  k.shared = static_cast<unsigned>(shared);
  k.scratch = static_cast<unsigned>(scratch);
  k.kinds = std::move(kinds);
  return k;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ autograd node of the eager CSA op (kernels/csa/node.py)";
  m.attr("ARG_COUNTS") = py::make_tuple(kFwdArgs, kDqArgs, kDkvArgs);  // forward, dq, dk/dv launches
  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan");
  m.def(
      "make_plan",
      [](py::tuple fwd, py::tuple dq, py::tuple dkv, int64_t T, int64_t Tc, double qk_scale, double scale,
         std::vector<int64_t> saved, std::vector<int64_t> temp) {
        TORCH_CHECK(saved.size() == 3 && temp.size() == 3, "hyla csa node: layouts are (bytes, offset, offset)");
        auto kernel = [](py::tuple d, size_t n_args) {
          TORCH_CHECK(d.size() == 6, "hyla csa node: a kernel is (function, grid, threads, shared, scratch, kinds)");
          return make_kernel(d[0].cast<int64_t>(), d[1].cast<std::vector<int64_t>>(), d[2].cast<int64_t>(),
                             d[3].cast<int64_t>(), d[4].cast<int64_t>(), d[5].cast<std::vector<int64_t>>(), n_args);
        };
        auto p = std::make_shared<Plan>();
        p->fwd = kernel(fwd, kFwdArgs);
        p->dq = kernel(dq, kDqArgs);
        p->dkv = kernel(dkv, kDkvArgs);
        p->T = T;
        p->Tc = Tc;
        p->qk_scale = qk_scale;
        p->scale = scale;
        p->saved_bytes = saved[0], p->dcl_off = saved[1], p->lse_off = saved[2];
        p->temp_bytes = temp[0], p->dx_off = temp[1], p->delta_off = temp[2];
        std::lock_guard<std::mutex> lock(plans_mutex);
        plans.push_back(p);
        return p;
      },
      "A plan from the bound kernels: each (CUfunction, grid, threads, shared bytes, scratch pointers, kinds).");
  m.def(
      "apply",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kc, const Tensor& vc, const Tensor& blend,
         const std::shared_ptr<Plan>& plan) {
        return CSANode::apply(q, k, v, kc, vc, blend, static_cast<const Plan*>(plan.get()))[0];
      },
      "o = csa_attention(q, k, v, kc, vc, blend) through the plan's kernels, differentiable.");
}
