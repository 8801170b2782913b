// Newton-Schulz stages for Muon on tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulation).
//
// One tile kernel, O = alpha * (L R) + beta * E, batched over a stack (blockIdx.z), in three uses per
// quintic step (see kernels/ns/reference.py):
//   ns_sym  (R given as rows, R = L^T-like):  A = X X^T          (alpha 1, beta 0)
//                                             B = c A A^T + b A  (A symmetric, so A^2 = A A^T)
//   ns_gemm (R given as [K, N] rows):         X' = B X + a X     (alpha 1, beta a)
// ns_sym computes only the tiles on and above the diagonal and stores each one mirrored too;
// ns_sym_full computes every tile (to measure what the symmetry saves).
//
// Layout contract (kernels/ns/cuda.py keeps it): every matrix is bf16, row-major, with both dims padded
// by zeros to multiples of the 64 x 64 tile (zero padding stays zero through the iteration), so there are
// no bounds checks. Self-contained (no headers) so NVRTC and nvcc both compile it as is.

#define BM 64
#define BN 64
#define BK 32
#define PAD 8  // bf16 elements of row padding in shared memory: conflict-free ldmatrix rows
#define THREADS 128

typedef unsigned short bf16_t;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {  // round to nearest even
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Tile (ti, tj) of O = alpha * L R + beta * E for one matrix of the stack. L: [*, K] rows (ld ldl).
// R: if R_KN, [K, *] rows (ld ldr), else [*, K] rows used transposed (R^T tile rows tj).
template <bool R_KN, bool MIRROR>
__device__ __forceinline__ void tile_mma(const bf16_t* __restrict__ L, const bf16_t* __restrict__ R,
                                         const bf16_t* __restrict__ E, bf16_t* __restrict__ O, int ti, int tj,
                                         int K, int ldl, int ldr, int lde, int ldo, float alpha, float beta) {
    __shared__ __align__(16) bf16_t Ls[2][BM][BK + PAD];
    __shared__ __align__(16) bf16_t Rs[2][R_KN ? BK : BN][R_KN ? BN + PAD : BK + PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // 2 x 2 warps, 32 x 32 each
    const bf16_t* Lb = L + (long long)ti * BM * ldl;
    const bf16_t* Rb = R_KN ? R + tj * BN : R + (long long)tj * BN * ldr;

    auto load = [&](int buf, int k0) {
#pragma unroll
        for (int c = tid; c < BM * BK / 8; c += THREADS) {  // 16-byte chunks
            int r = c / (BK / 8), q = (c % (BK / 8)) * 8;
            cp_async16(&Ls[buf][r][q], Lb + (long long)r * ldl + k0 + q);
        }
#pragma unroll
        for (int c = tid; c < BN * BK / 8; c += THREADS) {
            if (R_KN) {
                int r = c / (BN / 8), q = (c % (BN / 8)) * 8;
                cp_async16(&Rs[buf][r][q], Rb + (long long)(k0 + r) * ldr + q);
            } else {
                int r = c / (BK / 8), q = (c % (BK / 8)) * 8;
                cp_async16(&Rs[buf][r][q], Rb + (long long)r * ldr + k0 + q);
            }
        }
        asm volatile("cp.async.commit_group;");
    };

    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

    const int nk = K / BK;
    load(0, 0);
    for (int kt = 0; kt < nk; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nk) {
            load(buf ^ 1, (kt + 1) * BK);
            asm volatile("cp.async.wait_group 1;");
        } else {
            asm volatile("cp.async.wait_group 0;");
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[2][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                ldsm_x4(af[mi], &Ls[buf][wm * 32 + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
            for (int p = 0; p < 2; p++) {  // two n8 tiles per ldmatrix.x4
                unsigned r[4];
                if (R_KN)
                    ldsm_x4_t(r, &Rs[buf][kk + (lane & 7) + ((lane >> 3) & 1) * 8][wn * 32 + p * 16 + (lane >> 4) * 8]);
                else
                    ldsm_x4(r, &Rs[buf][wn * 32 + p * 16 + (lane & 7) + (lane >> 4) * 8][kk + ((lane >> 3) & 1) * 8]);
                bfr[2 * p][0] = r[0];
                bfr[2 * p][1] = r[1];
                bfr[2 * p + 1][0] = r[2];
                bfr[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int nj = 0; nj < 4; nj++) mma16816(acc[mi][nj], af[mi], bfr[nj]);
        }
        __syncthreads();
    }

    // epilogue: accumulator fragment (row g, cols 2q, 2q+1) and (row g + 8, same cols)
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = ti * BM + wm * 32 + mi * 16 + (lane >> 2) + h * 8;
                const int c = tj * BN + wn * 32 + nj * 8 + (lane & 3) * 2;
                float v0 = alpha * acc[mi][nj][2 * h], v1 = alpha * acc[mi][nj][2 * h + 1];
                if (beta != 0.f) {
                    unsigned e = *(const unsigned*)(E + (long long)r * lde + c);
                    v0 += beta * bf2f((bf16_t)(e & 0xffff));
                    v1 += beta * bf2f((bf16_t)(e >> 16));
                }
                const unsigned packed = pack_bf16x2(v0, v1);
                *(unsigned*)(O + (long long)r * ldo + c) = packed;
                if (MIRROR && ti != tj) {
                    O[(long long)c * ldo + r] = (bf16_t)(packed & 0xffff);
                    O[(long long)(c + 1) * ldo + r] = (bf16_t)(packed >> 16);
                }
            }
}

// Symmetric product O = alpha * L L'^T + beta * E over tiles on and above the diagonal (blockIdx.x indexes
// them row by row), mirrored. L and R point at the same matrix in both uses; nt = tiles per side.
extern "C" __global__ void __launch_bounds__(THREADS)
    ns_sym(const bf16_t* L, const bf16_t* R, const bf16_t* E, bf16_t* O, int nt, int K, int ldl, int lde,
           int ldo, long long sl, long long se, long long so, float alpha, float beta) {
    int t = blockIdx.x, ti = 0;
    while (t >= nt - ti) {
        t -= nt - ti;
        ti++;
    }
    const long long z = blockIdx.z;
    tile_mma<false, true>(L + z * sl, R + z * sl, E + z * se, O + z * so, ti, ti + t, K, ldl, ldl, lde, ldo,
                          alpha, beta);
}

// Same product over all nt x nt tiles, no mirroring (the baseline for the symmetric saving).
extern "C" __global__ void __launch_bounds__(THREADS)
    ns_sym_full(const bf16_t* L, const bf16_t* R, const bf16_t* E, bf16_t* O, int nt, int K, int ldl,
                int lde, int ldo, long long sl, long long se, long long so, float alpha, float beta) {
    const long long z = blockIdx.z;
    tile_mma<false, false>(L + z * sl, R + z * sl, E + z * se, O + z * so, blockIdx.x / nt, blockIdx.x % nt,
                           K, ldl, ldl, lde, ldo, alpha, beta);
}

// General product O = alpha * L R + beta * E with R given as [K, N] rows; grid (N / BN, M / BM, stack).
extern "C" __global__ void __launch_bounds__(THREADS)
    ns_gemm(const bf16_t* L, const bf16_t* R, const bf16_t* E, bf16_t* O, int K, int ldl, int ldr, int lde,
            int ldo, long long sl, long long sr, long long se, long long so, float alpha, float beta) {
    const long long z = blockIdx.z;
    tile_mma<true, false>(L + z * sl, R + z * sr, E + z * se, O + z * so, blockIdx.y, blockIdx.x, K, ldl, ldr,
                          lde, ldo, alpha, beta);
}
