// pyhyla: the C engine (csrc/hyla.c) for Python, for tests and benchmarks.
//
//   import pyhyla
//   m = pyhyla.Engine("model.bin", threads=2)   # ValueError on a missing, corrupt or mismatched file
//   logits = m.prefill([1, 5, 9])               # [vocab] float32 of the last token; all_logits=True: [T, vocab]
//   logits = m.forward(17)                      # one decoding step
//   m.reset()
//   tok = pyhyla.Tokenizer("tokenizer.bin"); tok.encode("text", bos=True); tok.decode(ids)
//   pyhyla.read_bandwidth(threads=2)              # GB/s of a plain parallel read (benchmark reference)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "hyla.h"

namespace py = pybind11;

class Engine {
  public:
    Engine(const std::string &path, int threads) {
        char err[512];
        hyla_set_threads(threads);
        if (hyla_load(&m_, path.c_str(), err, sizeof err)) throw std::invalid_argument(err);
    }
    ~Engine() { hyla_free(m_); }
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    void reset() { hyla_reset(m_); }
    int pos() const { return hyla_pos(m_); }

    py::array_t<float> prefill(const std::vector<int> &tokens, bool all_logits) {
        int V = hyla_config(m_)->vocab_size, n = (int)tokens.size();
        std::vector<py::ssize_t> shape = all_logits ? std::vector<py::ssize_t>{n, V} : std::vector<py::ssize_t>{V};
        py::array_t<float> out(shape);
        float *dst = out.mutable_data();
        int rc;
        {
            py::gil_scoped_release release;
            rc = hyla_forward(m_, tokens.data(), n, dst, all_logits);
        }
        if (rc) throw std::invalid_argument(hyla_error(m_));
        return out;
    }

    py::array_t<float> forward(int token) { return prefill({token}, false); }

    std::vector<int> generate(const std::vector<int> &prompt, int max_new, float temperature, float top_p,
                              uint64_t seed, int stop_id) {
        HylaSampler s;
        if (max_new < 0) throw std::invalid_argument("max_new must be >= 0");
        if (hyla_sampler_init(&s, hyla_config(m_)->vocab_size, temperature, top_p, seed)) throw std::bad_alloc();
        std::vector<int> out(max_new + 1);
        int n;
        {
            py::gil_scoped_release release;
            n = hyla_generate(m_, &s, prompt.data(), (int)prompt.size(), max_new, stop_id, out.data());
        }
        hyla_sampler_free(&s);
        if (n < 0) throw std::invalid_argument(hyla_error(m_));
        out.resize(n);
        return out;
    }

    py::dict config() const {
        const HylaConfig *c = hyla_config(m_);
        py::dict d;
        d["vocab_size"] = c->vocab_size; d["dim"] = c->dim; d["n_layers"] = c->n_layers;
        d["max_seq_len"] = c->max_seq_len; d["n_heads"] = c->n_heads; d["n_kv_heads"] = c->n_kv_heads;
        d["head_dim"] = c->head_dim; d["rotary_dim"] = c->rotary_dim; d["csa_stride"] = c->csa_stride;
        d["csa_window"] = c->csa_window; d["gdn_heads"] = c->gdn_heads; d["gdn_head_dim"] = c->gdn_head_dim;
        d["gdn_conv"] = c->gdn_conv; d["ffn_hidden"] = c->ffn_hidden;
        d["hyper_connections"] = bool(c->hyper_connections); d["norm_eps"] = c->norm_eps;
        d["rope_theta"] = c->rope_theta; d["rope_fraction"] = c->rope_fraction;
        d["quantized"] = bool(hyla_is_quantized(m_));
        std::vector<int> kinds(c->layer_types, c->layer_types + c->n_layers);
        d["layer_types"] = kinds;
        return d;
    }

  private:
    Hyla *m_ = nullptr;
};

class Tokenizer {
  public:
    explicit Tokenizer(const std::string &path) {
        char err[512];
        if (hyla_tokenizer_load(&t_, path.c_str(), err, sizeof err)) throw std::invalid_argument(err);
    }
    ~Tokenizer() { hyla_tokenizer_free(t_); }
    Tokenizer(const Tokenizer &) = delete;
    Tokenizer &operator=(const Tokenizer &) = delete;

    std::vector<int> encode(const std::string &text, bool bos, bool eos) const {
        if (text.find('\0') != std::string::npos) throw std::invalid_argument("text contains a NUL byte");
        std::vector<int> ids(text.size() + 3);
        int n = hyla_encode(t_, text.c_str(), bos, eos, ids.data());
        if (n < 0) throw std::bad_alloc();
        ids.resize(n);
        return ids;
    }

    py::bytes decode(const std::vector<int> &ids) const {
        std::string out;
        std::vector<char> buf(2 * hyla_tokenizer_max_piece(t_) + 16);
        int prev = -1;
        for (int id : ids) {
            int n = hyla_decode_piece(t_, prev, id, buf.data());
            if (n < 0) throw std::invalid_argument("token id " + std::to_string(id) + " out of range");
            out.append(buf.data(), n);
            prev = id;
        }
        return py::bytes(out);
    }

    int vocab_size() const { return hyla_tokenizer_vocab(t_); }
    int bos_id() const { return hyla_tokenizer_bos(t_); }
    int eos_id() const { return hyla_tokenizer_eos(t_); }

  private:
    HylaTokenizer *t_ = nullptr;
};

PYBIND11_MODULE(pyhyla, mod) {
    mod.doc() = "The hyla C inference engine (csrc/hyla.c)";
    py::class_<Engine>(mod, "Engine")
        .def(py::init<const std::string &, int>(), py::arg("path"), py::arg("threads") = 0)
        .def("reset", &Engine::reset, "forget the sequence")
        .def("forward", &Engine::forward, py::arg("token"), "one token -> logits [vocab]")
        .def("prefill", &Engine::prefill, py::arg("tokens"), py::arg("all_logits") = false,
             "tokens -> logits of the last [vocab] (all_logits: [T, vocab]), one batched pass")
        .def("generate", &Engine::generate, py::arg("prompt"), py::arg("max_new"), py::arg("temperature") = 0.0f,
             py::arg("top_p") = 0.9f, py::arg("seed") = 0, py::arg("stop_id") = -1,
             "continue from prompt; greedy at temperature 0")
        .def_property_readonly("pos", &Engine::pos)
        .def_property_readonly("config", &Engine::config);
    py::class_<Tokenizer>(mod, "Tokenizer")
        .def(py::init<const std::string &>(), py::arg("path"))
        .def("encode", &Tokenizer::encode, py::arg("text"), py::arg("bos") = false, py::arg("eos") = false)
        .def("decode", &Tokenizer::decode, py::arg("ids"), "UTF-8 bytes of the ids")
        .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
        .def_property_readonly("bos_id", &Tokenizer::bos_id)
        .def_property_readonly("eos_id", &Tokenizer::eos_id);
    mod.def("set_threads", &hyla_set_threads, py::arg("n"));
    mod.def(
        "read_bandwidth",
        [](int threads, double mib, int passes) {
            hyla_set_threads(threads);
            double bps;
            {
                py::gil_scoped_release release;
                bps = hyla_read_bandwidth((size_t)(mib * (1 << 20)), passes);
            }
            if (bps < 0) throw std::bad_alloc();
            return bps / 1e9;
        },
        py::arg("threads"), py::arg("mib") = 256.0, py::arg("passes") = 10,
        "GB/s of the engine's own parallel read of a buffer (see hyla_read_bandwidth)");
}
