/* hyla inference engine: loader, forward pass (batched prefill and one-token decoding), sampler,
 * SentencePiece BPE tokenizer. The model is shared/spec/hybrid-95m.md; the file format train/export.py.
 *
 * Forward for a chunk of T tokens at position pos (T = 1 when decoding):
 *   x = E[tokens]; per block: h = (1 + r_a) x + (1 + s_a) mixer(norm(x)); x = (1 + r_f) h + (1 + s_f) ffn(norm(h))
 *   logits = norm(x) E^T.
 * Matrix products run over the T rows at once (each weight row is read once per chunk); the recurrent
 * parts (GDN state, CSA window ring and compressed cache, KV cache) step through the tokens in order.
 * OpenMP splits matrix rows and heads across threads.
 */
#include "hyla.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HEADER_BYTES 512
#define ENTRY_BYTES 128
#define NAME_BYTES 80
#define FORMAT_VERSION 1
#define ALIGN 64
#define CHUNK 64   /* prefill tokens per batched pass */
#define LANES 16   /* accumulator width of the dot products: one AVX-512 / two AVX2 vectors */
#define QGROUP 64  /* int8 quantization group (input dims per scale) */
#define L2_EPS 1e-6f /* GDN q/k L2 norm: x / sqrt(sum x^2 + eps) */
#define PAR_MIN (1L << 16) /* multiply-adds below which a loop stays on one thread (fork/join costs more) */
#define PAR_MIN_ATTN (1L << 13) /* the same for attention, whose loops also do exp and scattered reads */

enum { DT_F32 = 0, DT_Q8 = 1 };

/* Hot loops get AVX-512 and AVX2 clones picked at load time (ifunc), so the default build runs on any
 * x86-64 and still uses the wide units; HYLA_NATIVE builds compile everything for the build machine. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(HYLA_NATIVE)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_KERNELS 1 /* AVX-512 (fp32 prefill) and VNNI (int8) kernels, used when the CPU has them */
#endif

/* ----------------------------------------------------------------------------- file layout */

typedef struct {
    char magic[8];
    uint32_t version, header_bytes, n_tensors, quant_group;
    uint64_t file_bytes;
    uint32_t data_crc, header_crc;
    int32_t vocab_size, dim, n_layers, max_seq_len, n_heads, n_kv_heads, head_dim, rotary_dim;
    int32_t csa_stride, csa_window, gdn_heads, gdn_head_dim, gdn_conv, ffn_hidden, hyper_connections, reserved;
    double norm_eps, rope_theta, rope_fraction;
    uint8_t layer_types[256];
} FileHeader;

typedef struct {
    char name[NAME_BYTES];
    uint32_t dtype, ndim, shape[4];
    uint64_t offset, nbytes;
    uint32_t reserved, pad;
} FileEntry;

_Static_assert(sizeof(FileHeader) <= HEADER_BYTES, "header layout");
_Static_assert(sizeof(FileEntry) == ENTRY_BYTES, "table entry layout");

/* ----------------------------------------------------------------------------- model */

typedef struct {  /* a [rows, cols] weight, fp32 or int8 with fp32 scales per group of cols */
    int dtype, rows, cols;
    const float *f;
    const uint8_t *q;  /* int8 weights stored offset by 128 (q + 128), [rows, cols] as in the file */
    const float *s;    /* their scales [rows, groups] */
    const uint8_t *pk; /* with VNNI: the same int8 weights and scales repacked for the VNNI kernel (pack_q8) */
} Mat;

typedef struct {
    const float *attn_norm, *ffn_norm, *hc[4]; /* hc: attn residual, attn sublayer, ffn residual, ffn sublayer */
    Mat w1, w2, w3;
    Mat wq, wk, wv, wo, compress_k, compress_v, blend_gate; /* attention and CSA */
    const float *q_norm, *k_norm;
    Mat in_qkv, in_z, in_b, in_a, out_proj; /* GDN */
    const float *conv, *dt_bias, *A_log, *gnorm;
} Layer;

typedef struct {
    float *k, *v;          /* full: KV cache [max_seq_len, kv]; CSA: window ring [window, kv] (RoPE'd k) */
    float *kc, *vc;        /* CSA: compressed blocks [max_seq_len / stride + 1, kv] */
    float *pend_k, *pend_v; /* CSA: sums of the unfinished block, k before RoPE, raw v [kv] */
    float *conv, *convw, *S; /* GDN: last conv - 1 inputs [conv - 1, C]; conv weight [conv, C]; state [heads, Dk, Dv] */
} LayerState;

struct Hyla {
    HylaConfig c;
    void *map;
    size_t map_bytes;
    int quantized;
    Mat emb;
    const float *final_norm;
    Layer *layers;
    LayerState *st;
    float *cos, *sin;        /* [max_seq_len, rotary_dim / 2] */
    float *x, *xn, *f;       /* [CHUNK, dim] */
    float *p1, *p2, *kb, *vb, *kraw, *blend, *ctx, *ba; /* per-chunk projections */
    float *scores;           /* per thread [max keys] */
    int8_t *xq;              /* int8 activations [CHUNK, widest input], their scales and sums per group */
    float *xqs;
    int32_t *xqsum;
    uint8_t *packed;         /* with VNNI: all int8 matrices in the VNNI layout (Mat.pk points in here) */
    size_t packed_bytes;
    int vnni, avx512;
    int max_keys, n_threads, pos;
    char err[512];
};

static int fail(char *err, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return 1;
}

static void *xcalloc(size_t n, size_t size) { return n && size ? calloc(n, size) : calloc(1, 1); }

/* ----------------------------------------------------------------------------- CRC32 (slice-by-8) */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    if (crc_table[0][1]) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

/* zlib-compatible crc32(crc, buf, n) */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) { crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8); n--; }
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= crc;
        crc = crc_table[7][a & 0xFF] ^ crc_table[6][(a >> 8) & 0xFF] ^ crc_table[5][(a >> 16) & 0xFF] ^
              crc_table[4][a >> 24] ^ crc_table[3][b & 0xFF] ^ crc_table[2][(b >> 8) & 0xFF] ^
              crc_table[1][(b >> 16) & 0xFF] ^ crc_table[0][b >> 24];
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ----------------------------------------------------------------------------- loader */

typedef struct {
    const uint8_t *base;
    size_t size;
    const FileEntry *table;
    uint32_t n;
    uint8_t *used;
    char *err;
    size_t errlen;
} Reader;

/* Find `name` in the table and check its shape (ndim dims in d[]) and dtype. */
static const FileEntry *find_tensor(Reader *r, const char *name, int ndim, const int *d, int allow_q8) {
    for (uint32_t i = 0; i < r->n; i++) {
        const FileEntry *e = &r->table[i];
        if (strncmp(e->name, name, NAME_BYTES) != 0) continue;
        if (r->used[i]) { fail(r->err, r->errlen, "tensor %s appears twice", name); return NULL; }
        r->used[i] = 1;
        int ok = (int)e->ndim == ndim;
        for (int k = 0; ok && k < ndim; k++) ok = e->shape[k] == (uint32_t)d[k];
        if (!ok) {
            char got[96] = "", want[96] = "";
            for (uint32_t k = 0; k < e->ndim && k < 4; k++) snprintf(got + strlen(got), 20, "%u,", e->shape[k]);
            for (int k = 0; k < ndim; k++) snprintf(want + strlen(want), 20, "%d,", d[k]);
            fail(r->err, r->errlen, "tensor %s has shape [%s], the config implies [%s]", name, got, want);
            return NULL;
        }
        uint64_t numel = 1;
        for (int k = 0; k < ndim; k++) numel *= (uint64_t)d[k];
        uint64_t want_bytes;
        if (e->dtype == DT_F32) {
            want_bytes = numel * 4;
        } else if (e->dtype == DT_Q8 && allow_q8 && ndim == 2 && d[1] % LANES == 0) {
            want_bytes = (numel + ALIGN - 1) / ALIGN * ALIGN + (uint64_t)d[0] * ((d[1] + QGROUP - 1) / QGROUP) * 4;
        } else {
            fail(r->err, r->errlen, "tensor %s has dtype %u, not allowed there", name, e->dtype);
            return NULL;
        }
        if (e->nbytes != want_bytes || e->offset % ALIGN || e->offset > r->size || e->nbytes > r->size - e->offset) {
            fail(r->err, r->errlen, "tensor %s: bad offset/size (%llu, %llu bytes)", name,
                 (unsigned long long)e->offset, (unsigned long long)e->nbytes);
            return NULL;
        }
        return e;
    }
    fail(r->err, r->errlen, "tensor %s is missing from the file", name);
    return NULL;
}

static int get_vec(Reader *r, const float **out, const char *name, int n) {
    const FileEntry *e = find_tensor(r, name, 1, &n, 0);
    if (!e) return 1;
    *out = (const float *)(r->base + e->offset);
    return 0;
}

static int get_mat(Reader *r, Mat *m, const char *name, int rows, int cols) {
    int d[2] = {rows, cols};
    const FileEntry *e = find_tensor(r, name, 2, d, 1);
    if (!e) return 1;
    m->dtype = (int)e->dtype;
    m->rows = rows;
    m->cols = cols;
    if (e->dtype == DT_F32) {
        m->f = (const float *)(r->base + e->offset);
    } else {
        size_t qbytes = ((size_t)rows * cols + ALIGN - 1) / ALIGN * ALIGN;
        m->q = (const uint8_t *)(r->base + e->offset);
        m->s = (const float *)(r->base + e->offset + qbytes);
    }
    return 0;
}

static int check_config(const FileHeader *h, HylaConfig *c, char *err, size_t len) {
    int v[] = {h->vocab_size, h->dim, h->n_layers, h->max_seq_len, h->n_heads, h->n_kv_heads, h->head_dim,
               h->csa_stride, h->csa_window, h->gdn_heads, h->gdn_head_dim, h->gdn_conv, h->ffn_hidden};
    for (size_t i = 0; i < sizeof v / sizeof *v; i++)
        if (v[i] <= 0 || v[i] > (1 << 20)) return fail(err, len, "config field %zu out of range (%d)", i, v[i]);
    if (h->n_layers > 256) return fail(err, len, "n_layers %d > 256", h->n_layers);
    if (h->head_dim > 512 || h->gdn_head_dim > 512 || h->gdn_conv < 2)
        return fail(err, len, "head_dim %d and gdn_head_dim %d must be <= 512, gdn_conv %d >= 2", h->head_dim,
                    h->gdn_head_dim, h->gdn_conv);
    if (h->n_heads % h->n_kv_heads) return fail(err, len, "n_heads %d not a multiple of n_kv_heads %d", h->n_heads, h->n_kv_heads);
    if (h->rotary_dim <= 0 || h->rotary_dim > h->head_dim || h->rotary_dim % 2 ||
        h->rotary_dim != (int)lround(h->head_dim * h->rope_fraction))
        return fail(err, len, "rotary_dim %d inconsistent with head_dim %d x rope_fraction %g", h->rotary_dim,
                    h->head_dim, h->rope_fraction);
    if (!(h->norm_eps > 0 && h->norm_eps < 1) || !(h->rope_theta > 1 && h->rope_theta < 1e12))
        return fail(err, len, "norm_eps %g or rope_theta %g out of range", h->norm_eps, h->rope_theta);
    if (h->quant_group != QGROUP) return fail(err, len, "quant_group %u, this engine uses %d", h->quant_group, QGROUP);
    if (h->hyper_connections != 0 && h->hyper_connections != 1) return fail(err, len, "hyper_connections flag %d", h->hyper_connections);
    for (int i = 0; i < h->n_layers; i++)
        if (h->layer_types[i] > HYLA_FULL) return fail(err, len, "layer %d has unknown kind %u", i, h->layer_types[i]);
    *c = (HylaConfig){h->vocab_size, h->dim, h->n_layers, h->max_seq_len, h->n_heads, h->n_kv_heads, h->head_dim,
                      h->rotary_dim, h->csa_stride, h->csa_window, h->gdn_heads, h->gdn_head_dim, h->gdn_conv,
                      h->ffn_hidden, h->hyper_connections, (int)h->quant_group, h->norm_eps, h->rope_theta,
                      h->rope_fraction, {0}};
    memcpy(c->layer_types, h->layer_types, sizeof c->layer_types);
    return 0;
}

/* Bind every tensor the config implies (the names are the PyTorch state_dict keys). */
static int bind_weights(Hyla *m, Reader *r) {
    const HylaConfig *c = &m->c;
    int d = c->dim, H = c->n_heads, Hkv = c->n_kv_heads, D = c->head_dim, Hg = c->gdn_heads, Dg = c->gdn_head_dim;
    char n[NAME_BYTES];
    int e = get_mat(r, &m->emb, "embedding.weight", c->vocab_size, d);
    e = e || get_vec(r, &m->final_norm, "norm.weight", d);
#define P(s) (snprintf(n, sizeof n, "layers.%d.%s", i, s), n)
    for (int i = 0; i < c->n_layers && !e; i++) {
        Layer *L = &m->layers[i];
        e = get_vec(r, &L->attn_norm, P("attention_norm.weight"), d) || get_vec(r, &L->ffn_norm, P("ffn_norm.weight"), d) ||
            get_mat(r, &L->w1, P("ffn.w1.weight"), c->ffn_hidden, d) || get_mat(r, &L->w3, P("ffn.w3.weight"), c->ffn_hidden, d) ||
            get_mat(r, &L->w2, P("ffn.w2.weight"), d, c->ffn_hidden);
        if (!e && c->hyper_connections) {
            const char *hc[4] = {"attn_residual_scale", "attn_sublayer_scale", "ffn_residual_scale", "ffn_sublayer_scale"};
            for (int k = 0; k < 4 && !e; k++) e = get_vec(r, &L->hc[k], P(hc[k]), d);
        }
        if (e) break;
        if (c->layer_types[i] == HYLA_GDN) {
            int C = 3 * Hg * Dg, conv[3] = {C, 1, c->gdn_conv};
            const FileEntry *ce = find_tensor(r, P("mixer.conv1d.weight"), 3, conv, 0);
            if (!ce) return 1;
            L->conv = (const float *)(r->base + ce->offset);
            e = get_mat(r, &L->in_qkv, P("mixer.in_proj_qkv.weight"), C, d) || get_mat(r, &L->in_z, P("mixer.in_proj_z.weight"), Hg * Dg, d) ||
                get_mat(r, &L->in_b, P("mixer.in_proj_b.weight"), Hg, d) || get_mat(r, &L->in_a, P("mixer.in_proj_a.weight"), Hg, d) ||
                get_vec(r, &L->dt_bias, P("mixer.dt_bias"), Hg) || get_vec(r, &L->A_log, P("mixer.A_log"), Hg) ||
                get_vec(r, &L->gnorm, P("mixer.norm.weight"), Dg) || get_mat(r, &L->out_proj, P("mixer.out_proj.weight"), d, Hg * Dg);
        } else {
            e = get_mat(r, &L->wq, P("mixer.wq.weight"), 2 * H * D, d) || get_mat(r, &L->wk, P("mixer.wk.weight"), Hkv * D, d) ||
                get_mat(r, &L->wv, P("mixer.wv.weight"), Hkv * D, d) || get_mat(r, &L->wo, P("mixer.wo.weight"), d, H * D) ||
                get_vec(r, &L->q_norm, P("mixer.q_norm.weight"), D) || get_vec(r, &L->k_norm, P("mixer.k_norm.weight"), D);
            if (!e && c->layer_types[i] == HYLA_CSA)
                e = get_mat(r, &L->compress_k, P("mixer.compress_k.weight"), Hkv * D, Hkv * D) ||
                    get_mat(r, &L->compress_v, P("mixer.compress_v.weight"), Hkv * D, Hkv * D) ||
                    get_mat(r, &L->blend_gate, P("mixer.blend_gate.weight"), H * D, d);
        }
    }
#undef P
    if (e) return 1;
    for (uint32_t i = 0; i < r->n; i++)
        if (!r->used[i]) return fail(r->err, r->errlen, "unexpected tensor %.80s (not implied by the config)", r->table[i].name);
    return 0;
}

static int alloc_state(Hyla *m) {
    const HylaConfig *c = &m->c;
    int kv = c->n_kv_heads * c->head_dim, C = 3 * c->gdn_heads * c->gdn_head_dim, T = CHUNK;
    int nblocks = c->max_seq_len / c->csa_stride + 1;
    m->st = xcalloc(c->n_layers, sizeof *m->st);
    if (!m->st) return 1;
    for (int i = 0; i < c->n_layers; i++) {
        LayerState *s = &m->st[i];
        if (c->layer_types[i] == HYLA_GDN) {
            s->conv = xcalloc((size_t)C * (c->gdn_conv - 1), sizeof(float));
            s->convw = xcalloc((size_t)C * c->gdn_conv, sizeof(float));
            s->S = xcalloc((size_t)c->gdn_heads * c->gdn_head_dim * c->gdn_head_dim, sizeof(float));
            if (!s->conv || !s->convw || !s->S) return 1;
            for (int ch = 0; ch < C; ch++) /* channel-contiguous taps: the conv loops run over channels */
                for (int k = 0; k < c->gdn_conv; k++) s->convw[(size_t)k * C + ch] = m->layers[i].conv[(size_t)ch * c->gdn_conv + k];
        } else {
            int rows = c->layer_types[i] == HYLA_FULL ? c->max_seq_len : c->csa_window;
            s->k = xcalloc((size_t)rows * kv, sizeof(float));
            s->v = xcalloc((size_t)rows * kv, sizeof(float));
            if (!s->k || !s->v) return 1;
            if (c->layer_types[i] == HYLA_CSA) {
                s->kc = xcalloc((size_t)nblocks * kv, sizeof(float));
                s->vc = xcalloc((size_t)nblocks * kv, sizeof(float));
                s->pend_k = xcalloc(kv, sizeof(float));
                s->pend_v = xcalloc(kv, sizeof(float));
                if (!s->kc || !s->vc || !s->pend_k || !s->pend_v) return 1;
            }
        }
    }
    int HD = c->n_heads * c->head_dim, G = c->gdn_heads * c->gdn_head_dim;
    int w1 = C > 2 * HD ? C : 2 * HD;
    if (c->ffn_hidden > w1) w1 = c->ffn_hidden;
    int w2 = G > c->ffn_hidden ? G : c->ffn_hidden;
    int wc = G > HD ? G : HD;
    m->x = xcalloc((size_t)T * c->dim, sizeof(float));
    m->xn = xcalloc((size_t)T * c->dim, sizeof(float));
    m->f = xcalloc((size_t)T * c->dim, sizeof(float));
    m->p1 = xcalloc((size_t)T * w1, sizeof(float));
    m->p2 = xcalloc((size_t)T * w2, sizeof(float));
    m->kb = xcalloc((size_t)T * kv, sizeof(float));
    m->vb = xcalloc((size_t)T * kv, sizeof(float));
    m->kraw = xcalloc((size_t)T * kv, sizeof(float));
    m->blend = xcalloc((size_t)T * HD, sizeof(float));
    m->ctx = xcalloc((size_t)T * wc, sizeof(float));
    m->ba = xcalloc((size_t)T * 2 * c->gdn_heads, sizeof(float));
#ifdef _OPENMP
    m->n_threads = omp_get_max_threads() > 256 ? omp_get_max_threads() : 256;
#else
    m->n_threads = 1;
#endif
    m->max_keys = c->max_seq_len + c->csa_window + nblocks;
    m->scores = xcalloc((size_t)m->n_threads * m->max_keys, sizeof(float));
    int widest = c->dim > c->ffn_hidden ? c->dim : c->ffn_hidden;
    widest = widest > G ? widest : G;
    widest = widest > HD ? widest : HD;
    widest = widest > kv ? widest : kv;
    m->xq = xcalloc((size_t)T * widest, 1);
    m->xqs = xcalloc((size_t)T * (widest / QGROUP + 1), sizeof(float));
    m->xqsum = xcalloc((size_t)T * (widest / QGROUP + 1), sizeof(int32_t));
#ifdef HAVE_AVX512_KERNELS
    m->avx512 = __builtin_cpu_supports("avx512f") && !getenv("HYLA_PORTABLE"); /* HYLA_PORTABLE: tests */
    m->vnni = m->avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#endif
    int half = c->rotary_dim / 2;
    m->cos = xcalloc((size_t)c->max_seq_len * half, sizeof(float));
    m->sin = xcalloc((size_t)c->max_seq_len * half, sizeof(float));
    if (!m->x || !m->xn || !m->f || !m->p1 || !m->p2 || !m->kb || !m->vb || !m->kraw || !m->blend || !m->ctx ||
        !m->ba || !m->scores || !m->cos || !m->sin || !m->xq || !m->xqs || !m->xqsum)
        return 1;
    /* RoPE tables as kernels/rope.py: angles in float64, then cast */
    for (int p = 0; p < c->max_seq_len; p++)
        for (int i = 0; i < half; i++) {
            double a = p * pow(c->rope_theta, -(double)(2 * i) / c->rotary_dim);
            m->cos[(size_t)p * half + i] = (float)cos(a);
            m->sin[(size_t)p * half + i] = (float)sin(a);
        }
    return 0;
}

/* The whole file in anonymous memory with transparent huge pages: decoding streams every weight once
 * per token, and 2 MiB pages spare the TLB misses of 4 KiB file pages (~15% faster than mmap'ing
 * the file here); a private copy also cannot change or vanish under the engine. */
static void *read_all(int fd, size_t size) {
    uint8_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(buf, size, MADV_HUGEPAGE);
#endif
    for (size_t done = 0; done < size;) {
        ssize_t n = read(fd, buf + done, size - done);
        if (n <= 0) {
            munmap(buf, size);
            if (n == 0) errno = EIO;
            return NULL;
        }
        done += (size_t)n;
    }
    return buf;
}

static int pack_weights(Hyla *m);

int hyla_load(Hyla **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    crc_init();
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(err, errlen, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) { close(fd); return fail(err, errlen, "%s is not a regular file", path); }
    size_t size = (size_t)sb.st_size;
    if (size < HEADER_BYTES) { close(fd); return fail(err, errlen, "%s: truncated (%zu bytes, no header)", path, size); }
    void *map = read_all(fd, size);
    close(fd);
    if (!map) return fail(err, errlen, "cannot read %s: %s", path, strerror(errno));
    Hyla *m = xcalloc(1, sizeof *m);
    Reader r = {.base = map, .size = size, .err = err, .errlen = errlen};
    FileHeader h;
    memcpy(&h, map, sizeof h);
    int e = 0;
    if (!m) e = fail(err, errlen, "out of memory");
    else if (memcmp(h.magic, "HYLAMODL", 8)) e = fail(err, errlen, "%s is not a hyla model file (bad magic)", path);
    else if (h.version != FORMAT_VERSION)
        e = fail(err, errlen, "%s: format version %u, this engine reads version %d (re-export it)", path, h.version, FORMAT_VERSION);
    else if (h.header_bytes != HEADER_BYTES || h.n_tensors == 0 || h.n_tensors > 100000 ||
             HEADER_BYTES + (uint64_t)h.n_tensors * ENTRY_BYTES > size)
        e = fail(err, errlen, "%s: corrupt header or truncated tensor table", path);
    else if (h.file_bytes != size)
        e = fail(err, errlen, "%s: %zu bytes, the header says %llu (truncated or corrupt)", path, size,
                 (unsigned long long)h.file_bytes);
    if (!e) {
        size_t table_end = HEADER_BYTES + (size_t)h.n_tensors * ENTRY_BYTES;
        size_t data_start = (table_end + ALIGN - 1) / ALIGN * ALIGN;
        uint8_t *head = malloc(data_start);
        if (!head || data_start > size) { free(head); e = fail(err, errlen, "%s: truncated", path); }
        else {
            memcpy(head, map, data_start);
            memset(head + offsetof(FileHeader, header_crc), 0, 4);
            uint32_t crc = crc32_update(0, head, data_start);
            free(head);
            if (crc != h.header_crc) e = fail(err, errlen, "%s: header checksum mismatch (corrupt file)", path);
            else if (crc32_update(0, (const uint8_t *)map + data_start, size - data_start) != h.data_crc)
                e = fail(err, errlen, "%s: data checksum mismatch (corrupt file)", path);
        }
    }
    e = e || check_config(&h, &m->c, err, errlen);
    if (!e) {
        r.table = (const FileEntry *)((const uint8_t *)map + HEADER_BYTES);
        r.n = h.n_tensors;
        r.used = xcalloc(r.n, 1);
        m->layers = xcalloc(m->c.n_layers, sizeof *m->layers);
        e = !r.used || !m->layers ? fail(err, errlen, "out of memory") : bind_weights(m, &r);
        for (uint32_t i = 0; !e && i < r.n; i++) m->quantized |= r.table[i].dtype == DT_Q8;
        free(r.used);
    }
    if (m) { m->map = map; m->map_bytes = size; }
    if (!e && alloc_state(m)) e = fail(err, errlen, "out of memory for the decoding state");
    if (!e && m->vnni && m->quantized && pack_weights(m)) e = fail(err, errlen, "out of memory for the int8 weights");
    if (e) { if (m) hyla_free(m); else munmap(map, size); return 1; }
    *out = m;
    return 0;
}

void hyla_free(Hyla *m) {
    if (!m) return;
    if (m->st)
        for (int i = 0; i < m->c.n_layers; i++) {
            LayerState *s = &m->st[i];
            free(s->k); free(s->v); free(s->kc); free(s->vc); free(s->pend_k); free(s->pend_v); free(s->conv); free(s->convw); free(s->S);
        }
    free(m->st); free(m->layers); free(m->cos); free(m->sin); free(m->x); free(m->xn); free(m->f); free(m->p1);
    free(m->p2); free(m->kb); free(m->vb); free(m->kraw); free(m->blend); free(m->ctx); free(m->ba); free(m->scores);
    free(m->xq); free(m->xqs); free(m->xqsum);
    if (m->packed) munmap(m->packed, m->packed_bytes);
    if (m->map) munmap(m->map, m->map_bytes);
    free(m);
}

const HylaConfig *hyla_config(const Hyla *m) { return &m->c; }
const char *hyla_error(const Hyla *m) { return m->err; }
int hyla_pos(const Hyla *m) { return m->pos; }
int hyla_is_quantized(const Hyla *m) { return m->quantized; }

void hyla_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n < 256 ? n : 256); /* scratch is sized for >= 256 threads */
#else
    (void)n;
#endif
}

void hyla_reset(Hyla *m) {
    const HylaConfig *c = &m->c;
    int kv = c->n_kv_heads * c->head_dim, C = 3 * c->gdn_heads * c->gdn_head_dim;
    for (int i = 0; i < c->n_layers; i++) {
        LayerState *s = &m->st[i];
        if (c->layer_types[i] == HYLA_GDN) {
            memset(s->conv, 0, sizeof(float) * C * (c->gdn_conv - 1));
            memset(s->S, 0, sizeof(float) * c->gdn_heads * c->gdn_head_dim * c->gdn_head_dim);
        } else if (c->layer_types[i] == HYLA_CSA) {
            memset(s->pend_k, 0, sizeof(float) * kv);
            memset(s->pend_v, 0, sizeof(float) * kv);
        }
    }
    m->pos = 0;
}

/* ----------------------------------------------------------------------------- matrix products */

static inline float hsum(const float *acc) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

/* y[r] = sum_i W[r, i] x[i] for rows [r0, r1) of one token. Each row is one contiguous stream with
 * 4 independent FMA chains (one chain would be bound by the FMA latency, below the memory bandwidth). */
HOT static void rows_f32_1(float *y, const float *x, const float *w, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (size_t)r * cols;
        float a[4][LANES] = {{0}};
        int i = 0;
        for (; i + 4 * LANES <= cols; i += 4 * LANES)
            for (int u = 0; u < 4; u++)
                for (int j = 0; j < LANES; j++) a[u][j] += wr[i + u * LANES + j] * x[i + u * LANES + j];
        for (; i < cols; i += LANES)
            for (int j = 0; j < LANES; j++) a[0][j] += wr[i + j] * x[i + j];
        for (int j = 0; j < LANES; j++) a[0][j] += a[1][j] + a[2][j] + a[3][j];
        y[r] = hsum(a[0]);
    }
}

/* y[t, r] = sum_i W[r, i] x[t, i] for rows [r0, r1) and T tokens; 4 tokens share each weight load. */
HOT static void rows_f32(float *y, int ldy, const float *x, int T, const float *w, int cols, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const float *wr = w + (size_t)r * cols;
        for (int t = 0; t + 4 <= T; t += 4) {
            float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
            const float *x0 = x + (size_t)t * cols, *x1 = x0 + cols, *x2 = x1 + cols, *x3 = x2 + cols;
            for (int i = 0; i < cols; i += LANES)
                for (int j = 0; j < LANES; j++) {
                    float wv = wr[i + j];
                    a0[j] += wv * x0[i + j]; a1[j] += wv * x1[i + j]; a2[j] += wv * x2[i + j]; a3[j] += wv * x3[i + j];
                }
            y[(size_t)t * ldy + r] = hsum(a0); y[(size_t)(t + 1) * ldy + r] = hsum(a1);
            y[(size_t)(t + 2) * ldy + r] = hsum(a2); y[(size_t)(t + 3) * ldy + r] = hsum(a3);
        }
    }
    for (int t = T / 4 * 4; t < T; t++) /* the remaining tokens (decoding: all): 4 rows share each x load */
        rows_f32_1(y + (size_t)t * ldy, x + (size_t)t * cols, w, cols, r0, r1);
}

/* int8 weights: activations are quantized per token and group of QGROUP dims the same way
 * (x ~ xq * xs, xq in [-127, 127]), so each group is an integer dot product:
 *   y[t, r] = sum_g ws[r, g] xs[t, g] sum_{i in g} wq[r, i] xq[t, i].
 * Weights are stored as wq + 128 (unsigned), which is what the VNNI instruction takes; the offset is
 * removed with the group sums of xq: sum (wq + 128) xq = sum wq xq + 128 sum xq (xsum). */
static void quantize_rows(int8_t *xq, float *xs, int32_t *xsum, const float *x, int T, int cols) {
    int ng = (cols + QGROUP - 1) / QGROUP;
    for (int t = 0; t < T; t++)
        for (int g = 0; g < ng; g++) {
            const float *xg = x + (size_t)t * cols + g * QGROUP;
            int8_t *qg = xq + (size_t)t * cols + g * QGROUP;
            int n = cols - g * QGROUP < QGROUP ? cols - g * QGROUP : QGROUP;
            float mx = 0;
            for (int i = 0; i < n; i++) mx = fabsf(xg[i]) > mx ? fabsf(xg[i]) : mx;
            float inv = mx > 0 ? 127.0f / mx : 0.0f;
            int32_t sum = 0;
            for (int i = 0; i < n; i++) { /* round to nearest even: |x inv| <= 127 < 2^22 */
                float r = (xg[i] * inv + 12582912.0f) - 12582912.0f;
                sum += qg[i] = (int8_t)r;
            }
            xs[(size_t)t * ng + g] = mx / 127.0f;
            xsum[(size_t)t * ng + g] = sum;
        }
}

/* Portable form: the compiler vectorizes the integer products. */
HOT static void rows_q8(float *y, int ldy, const int8_t *xq, const float *xs, int T, const uint8_t *q, const float *s,
                        int cols, int r0, int r1) {
    int ng = (cols + QGROUP - 1) / QGROUP;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = q + (size_t)r * cols;
        const float *sr = s + (size_t)r * ng;
        for (int t = 0; t < T; t++) {
            const int8_t *xt = xq + (size_t)t * cols;
            float acc = 0;
            for (int g = 0; g < ng; g++) {
                int n = cols - g * QGROUP < QGROUP ? cols - g * QGROUP : QGROUP;
                int32_t d = 0;
                for (int i = 0; i < n; i++) d += ((int32_t)qr[g * QGROUP + i] - 128) * (int32_t)xt[g * QGROUP + i];
                acc += (float)d * (sr[g] * xs[(size_t)t * ng + g]);
            }
            y[(size_t)t * ldy + r] = acc;
        }
    }
}

/* The VNNI layout: rows in blocks of 16 (the last one padded); per block, per group of QGROUP columns,
 * the 16 rows' scales (64 bytes) and then the group's weights as 4-column slices, 16 rows x 4 bytes each
 * (64 bytes: one vpdpbusd operand). A thread streams one contiguous run of blocks, scales included, and
 * one vpdpbusd with 4 broadcast activation bytes adds 4 products to each of 16 row sums: no horizontal
 * sums, one int -> float conversion and one FMA per 16 rows and group. */
#define VNNI_ROWS 16

static size_t packed_block_bytes(int cols) { return (size_t)(cols + QGROUP - 1) / QGROUP * 64 + (size_t)cols * VNNI_ROWS; }

static size_t packed_bytes(const Mat *W) {
    return (size_t)(W->rows + VNNI_ROWS - 1) / VNNI_ROWS * packed_block_bytes(W->cols);
}

/* The byte offset of weight (r, i) in the VNNI layout (its group's scales are 4 r % 16 bytes after the
 * group start, which is where the slices begin minus 64). */
static size_t packed_index(int cols, int r, int i) {
    int g = i / QGROUP, slice = i % QGROUP / 4;
    return (size_t)(r / VNNI_ROWS) * packed_block_bytes(cols) + (size_t)g * (64 + QGROUP * VNNI_ROWS) + 64 +
           (size_t)slice * 64 + r % VNNI_ROWS * 4 + i % 4;
}

static void pack_q8(uint8_t *dst, const Mat *W) {
    int rows = W->rows, cols = W->cols, ng = (cols + QGROUP - 1) / QGROUP;
    memset(dst, 0, packed_bytes(W)); /* padding rows: scale 0 */
    for (int r0 = 0; r0 < rows; r0 += VNNI_ROWS)
        for (int g = 0; g < ng; g++) {
            int n = cols - g * QGROUP < QGROUP ? cols - g * QGROUP : QGROUP;
            for (int r = r0; r < r0 + VNNI_ROWS && r < rows; r++) {
                memcpy(dst + (r - r0) * 4, &W->s[(size_t)r * ng + g], 4);
                for (int k = 0; k < n / 4; k++)
                    memcpy(dst + 64 + k * 64 + (r - r0) * 4, W->q + (size_t)r * cols + g * QGROUP + 4 * k, 4);
            }
            dst += 64 + (size_t)n * VNNI_ROWS;
        }
}

/* With VNNI, every int8 matrix is copied into the VNNI layout (one huge-page buffer) and the file's
 * copy of it is released. */
static int pack_weights(Hyla *m) {
    int n = 1;
    Mat **all = xcalloc((size_t)m->c.n_layers * 15 + 1, sizeof *all);
    if (!all) return 1;
    all[0] = &m->emb;
    for (int i = 0; i < m->c.n_layers; i++) {
        Layer *L = &m->layers[i];
        Mat *ms[15] = {&L->w1, &L->w2, &L->w3, &L->wq, &L->wk, &L->wv, &L->wo, &L->compress_k, &L->compress_v,
                       &L->blend_gate, &L->in_qkv, &L->in_z, &L->in_b, &L->in_a, &L->out_proj};
        for (int k = 0; k < 15; k++) all[n++] = ms[k];
    }
    size_t total = 0;
    for (int k = 0; k < n; k++) total += all[k]->dtype == DT_Q8 ? packed_bytes(all[k]) : 0;
    uint8_t *buf = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { free(all); return 1; }
#ifdef MADV_HUGEPAGE
    madvise(buf, total, MADV_HUGEPAGE);
#endif
    m->packed = buf;
    m->packed_bytes = total;
    long page = sysconf(_SC_PAGESIZE);
    for (int k = 0; k < n; k++) {
        Mat *W = all[k];
        if (W->dtype != DT_Q8) continue;
        pack_q8(buf, W);
        W->pk = buf;
        buf += packed_bytes(W);
        /* the file copy is not read again: give its whole pages back */
        uintptr_t lo = ((uintptr_t)W->q + page - 1) / page * page;
        uintptr_t hi = (uintptr_t)(W->s + (size_t)W->rows * ((W->cols + QGROUP - 1) / QGROUP)) / page * page;
        if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
        W->q = NULL;
        W->s = NULL;
    }
    free(all);
    return 0;
}

static float q8_weight(const Mat *W, int r, int i) {
    int ng = (W->cols + QGROUP - 1) / QGROUP;
    if (!W->pk) return ((int)W->q[(size_t)r * W->cols + i] - 128) * W->s[(size_t)r * ng + i / QGROUP];
    float sc;
    size_t at = packed_index(W->cols, r, i);
    memcpy(&sc, W->pk + at - 64 - (size_t)(i % QGROUP / 4) * 64 - i % 4, 4);
    return ((int)W->pk[at] - 128) * sc;
}

#ifdef HAVE_AVX512_KERNELS
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* One 16-row block for NT (1..4) tokens: y[t, 0..nrows) (row stride 1, token stride ldy). Per group
 * and token two int32 accumulators (even and odd slices) keep two vpdpbusd chains in flight; they start
 * at -128 sum(xq) (the offset correction). */
VNNI static inline __attribute__((always_inline)) void q8_block(float *y, int ldy, const int8_t *xq, const float *xs,
                                                               const int32_t *xsum, const int NT, const uint8_t *p,
                                                               int cols, int nrows) {
    int ng = (cols + QGROUP - 1) / QGROUP;
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        int slices = (cols - g * QGROUP < QGROUP ? cols - g * QGROUP : QGROUP) / 4;
        __m512 sc = _mm512_load_ps((const float *)p);
        const uint8_t *w = p + 64;
        __m512i a[4], b[4];
        for (int t = 0; t < NT; t++) {
            a[t] = _mm512_set1_epi32(-128 * xsum[(size_t)t * ng + g]);
            b[t] = _mm512_setzero_si512();
        }
        const int8_t *xg = xq + g * QGROUP;
        int k = 0;
        for (; k + 2 <= slices; k += 2) {
            __m512i w0 = _mm512_load_si512(w + k * 64), w1 = _mm512_load_si512(w + k * 64 + 64);
            for (int t = 0; t < NT; t++) {
                int32_t x0, x1;
                memcpy(&x0, xg + (size_t)t * cols + 4 * k, 4);
                memcpy(&x1, xg + (size_t)t * cols + 4 * k + 4, 4);
                a[t] = _mm512_dpbusd_epi32(a[t], w0, _mm512_set1_epi32(x0));
                b[t] = _mm512_dpbusd_epi32(b[t], w1, _mm512_set1_epi32(x1));
            }
        }
        if (k < slices) {
            __m512i w0 = _mm512_load_si512(w + k * 64);
            for (int t = 0; t < NT; t++) {
                int32_t x0;
                memcpy(&x0, xg + (size_t)t * cols + 4 * k, 4);
                a[t] = _mm512_dpbusd_epi32(a[t], w0, _mm512_set1_epi32(x0));
            }
        }
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[t], b[t])),
                                     _mm512_mul_ps(sc, _mm512_set1_ps(xs[(size_t)t * ng + g])), acc[t]);
        p = w + slices * 64;
    }
    __mmask16 mk = nrows >= VNNI_ROWS ? 0xFFFF : (__mmask16)((1u << nrows) - 1);
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + (size_t)t * ldy, mk, acc[t]);
}

/* Rows [r0, r1) (r0 a multiple of 16) of y [T, ldy] from the packed weights; 4 tokens share each block
 * pass in prefill (the block stays in L1 across token tiles). */
VNNI static void rows_q8_vnni(float *y, int ldy, const int8_t *xq, const float *xs, const int32_t *xsum, int T,
                              const uint8_t *pk, int cols, int r0, int r1) {
    int ng = (cols + QGROUP - 1) / QGROUP;
    size_t block = packed_block_bytes(cols);
    for (int r = r0; r < r1; r += VNNI_ROWS) {
        const uint8_t *p = pk + (size_t)(r / VNNI_ROWS) * block;
        int nrows = r1 - r < VNNI_ROWS ? r1 - r : VNNI_ROWS, t = 0;
        for (; t + 4 <= T; t += 4)
            q8_block(y + (size_t)t * ldy + r, ldy, xq + (size_t)t * cols, xs + (size_t)t * ng, xsum + (size_t)t * ng, 4,
                     p, cols, nrows);
        for (; t < T; t++)
            q8_block(y + (size_t)t * ldy + r, ldy, xq + (size_t)t * cols, xs + (size_t)t * ng, xsum + (size_t)t * ng, 1,
                     p, cols, nrows);
    }
}
#endif

#ifdef HAVE_AVX512_KERNELS
/* fp32 prefill on AVX-512: a 2-row x 4-token register tile (8 accumulators), so each loaded weight
 * vector feeds 4 FMAs and each token vector 2. cols % 16 == 0; rows r0..r1, tokens 0..T4 (T4 % 4 == 0). */
__attribute__((target("avx512f"))) static void tile_f32_avx512(float *y, int ldy, const float *x, int T4,
                                                               const float *w, int cols, int r0, int r1) {
    int r = r0;
    for (; r + 2 <= r1; r += 2) {
        const float *w0 = w + (size_t)r * cols, *w1 = w0 + cols;
        for (int t = 0; t < T4; t += 4) {
            const float *x0 = x + (size_t)t * cols;
            __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int i = 0; i < cols; i += 16) {
                __m512 u = _mm512_loadu_ps(w0 + i), v = _mm512_loadu_ps(w1 + i);
                __m512 b0 = _mm512_loadu_ps(x0 + i), b1 = _mm512_loadu_ps(x0 + cols + i);
                __m512 b2 = _mm512_loadu_ps(x0 + 2 * cols + i), b3 = _mm512_loadu_ps(x0 + 3 * cols + i);
                a00 = _mm512_fmadd_ps(u, b0, a00); a01 = _mm512_fmadd_ps(u, b1, a01);
                a02 = _mm512_fmadd_ps(u, b2, a02); a03 = _mm512_fmadd_ps(u, b3, a03);
                a10 = _mm512_fmadd_ps(v, b0, a10); a11 = _mm512_fmadd_ps(v, b1, a11);
                a12 = _mm512_fmadd_ps(v, b2, a12); a13 = _mm512_fmadd_ps(v, b3, a13);
            }
            float *yt = y + (size_t)t * ldy + r;
            yt[0] = _mm512_reduce_add_ps(a00); yt[ldy] = _mm512_reduce_add_ps(a01);
            yt[2 * ldy] = _mm512_reduce_add_ps(a02); yt[3 * ldy] = _mm512_reduce_add_ps(a03);
            yt[1] = _mm512_reduce_add_ps(a10); yt[ldy + 1] = _mm512_reduce_add_ps(a11);
            yt[2 * ldy + 1] = _mm512_reduce_add_ps(a12); yt[3 * ldy + 1] = _mm512_reduce_add_ps(a13);
        }
    }
    if (r < r1) rows_f32(y, ldy, x, T4, w, cols, r, r1);
}
#endif

typedef struct {
    float *y;
    const Mat *W;
} Product;

/* Rows [r0, r1) of y [T, W.rows] = x [T, W.cols] W^T. fp32 cols that are not a multiple of LANES go
 * through a scalar pass; int8 rows are multiples of LANES (checked at load) and x is already quantized. */
static void product_rows(const Hyla *m, const Product *p, const float *x, int T, int r0, int r1) {
    const Mat *W = p->W;
    int rows = W->rows, cols = W->cols;
    float *y = p->y;
    if (W->dtype == DT_Q8) {
#ifdef HAVE_AVX512_KERNELS
        if (W->pk) {
            rows_q8_vnni(y, rows, m->xq, m->xqs, m->xqsum, T, W->pk, cols, r0, r1);
            return;
        }
#endif
        rows_q8(y, rows, m->xq, m->xqs, T, W->q, W->s, cols, r0, r1);
    } else if (cols % LANES == 0) {
#ifdef HAVE_AVX512_KERNELS
        int T4 = m->avx512 ? T / 4 * 4 : 0;
        if (T4) tile_f32_avx512(y, rows, x, T4, W->f, cols, r0, r1);
        if (T4 < T) rows_f32(y + (size_t)T4 * rows, rows, x + (size_t)T4 * cols, T - T4, W->f, cols, r0, r1);
#else
        rows_f32(y, rows, x, T, W->f, cols, r0, r1);
#endif
    } else {
        for (int r = r0; r < r1; r++)
            for (int t = 0; t < T; t++) {
                float acc = 0;
                for (int i = 0; i < cols; i++) acc += W->f[(size_t)r * cols + i] * x[(size_t)t * cols + i];
                y[(size_t)t * rows + r] = acc;
            }
    }
}

/* This thread's share of W's rows, [*r0, *r1): an even split, in whole 16-row blocks for packed int8. */
static void row_share(const Mat *W, int *r0, int *r1) {
#ifdef _OPENMP
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
    int nt = 1, id = 0;
#endif
    int unit = W->pk ? VNNI_ROWS : 1, units = (W->rows + unit - 1) / unit;
    *r0 = (int)((long)units * id / nt) * unit;
    *r1 = (int)((long)units * (id + 1) / nt) * unit;
    *r1 = *r1 < W->rows ? *r1 : W->rows;
}

/* Inside a parallel region: this thread's rows of the n products that share the input x (quantized
 * already when the weights are int8). */
static void products_share(const Hyla *m, const float *x, int T, int n, const Product *p) {
    for (int k = 0; k < n; k++) {
        int r0, r1;
        row_share(p[k].W, &r0, &r1);
        product_rows(m, &p[k], x, T, r0, r1);
    }
}

static long product_work(int T, int n, const Product *p) {
    long work = 0;
    for (int k = 0; k < n; k++) work += (long)p[k].W->rows * p[k].W->cols * T;
    return work;
}

static void quantize_input(Hyla *m, const float *x, int T, const Mat *W) {
    if (W->dtype == DT_Q8) quantize_rows(m->xq, m->xqs, m->xqsum, x, T, W->cols);
}

/* Products that share their input x [T, cols], in one parallel region (one fork/join): every thread
 * takes an even share of every matrix's rows. */
static void matmuls(Hyla *m, const float *x, int T, int n, const Product *p) {
    quantize_input(m, x, T, p[0].W);
#pragma omp parallel if (product_work(T, n, p) >= PAR_MIN)
    products_share(m, x, T, n, p);
}

static void matmul(Hyla *m, float *y, const float *x, int T, const Mat *W) {
    Product p = {y, W};
    matmuls(m, x, T, 1, &p);
}

/* ----------------------------------------------------------------------------- elementwise */

/* e^x for the activations and softmax, written so loops over it vectorize (libm's expf is a call):
 * e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, exact
 * n ln2_hi), e^r by its degree-6 Taylor polynomial (truncation < 2e-7 relative); 2^n built in the
 * exponent bits. x is clamped to the normal float range first. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}
static inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
static inline float siluf(float x) { return x / (1.0f + exp_approx(-x)); }
static inline float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* torch's threshold 20 */

/* y = x / sqrt(mean(x^2) + eps) * (plus_one + w) */
static void rmsnorm(float *y, const float *x, const float *w, int n, float eps, float plus_one) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * (plus_one + w[i]);
}

/* rotate-half RoPE on the first rotary_dim dims of one head at position p */
static void rope(const Hyla *m, float *x, int p) {
    int half = m->c.rotary_dim / 2;
    const float *cs = m->cos + (size_t)p * half, *sn = m->sin + (size_t)p * half;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cs[i] - x2 * sn[i];
        x[i + half] = x2 * cs[i] + x1 * sn[i];
    }
}

/* softmax(scale q.k) v over n keys (rows of k/v with stride ld) into out [D]; sc is scratch [n] */
HOT static void attend(float *out, const float *q, const float *k, const float *v, int ld, int n, int D, float scale,
                   float *sc) {
    float mx = -INFINITY;
    for (int s = 0; s < n; s++) {
        const float *ks = k + (size_t)s * ld;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int i = 0; i < D; i++) a += q[i] * ks[i];
        sc[s] = a * scale;
        mx = sc[s] > mx ? sc[s] : mx;
    }
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int s = 0; s < n; s++) sum += sc[s] = exp_approx(sc[s] - mx);
    float inv = 1.0f / sum;
    for (int i = 0; i < D; i++) out[i] = 0;
    int s = 0;
    for (; s + 4 <= n; s += 4) { /* 4 keys per pass over out: fewer dependent load-add-stores */
        const float *v0 = v + (size_t)s * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;
        float p0 = sc[s] * inv, p1 = sc[s + 1] * inv, p2 = sc[s + 2] * inv, p3 = sc[s + 3] * inv;
        for (int i = 0; i < D; i++) out[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
    }
    for (; s < n; s++) {
        const float *vs = v + (size_t)s * ld;
        float p = sc[s] * inv;
        for (int i = 0; i < D; i++) out[i] += p * vs[i];
    }
}

static float *thread_scores(Hyla *m) {
#ifdef _OPENMP
    return m->scores + (size_t)omp_get_thread_num() * m->max_keys;
#else
    return m->scores;
#endif
}

/* ----------------------------------------------------------------------------- mixers */

/* q|gate = wq xn, k = wk xn, v = wv xn (and the CSA blend gate when `blend`); k RMS-normed per head,
 * then RoPE'd (kraw keeps k before RoPE); q is normed per head where it is used (head_query). */
static void attn_project(Hyla *m, const Layer *L, int T, int blend) {
    const HylaConfig *c = &m->c;
    int Hkv = c->n_kv_heads, D = c->head_dim, kv = Hkv * D;
    float eps = (float)c->norm_eps;
    Product p[4] = {{m->p1, &L->wq}, {m->kb, &L->wk}, {m->vb, &L->wv}, {m->blend, &L->blend_gate}};
    matmuls(m, m->xn, T, blend ? 4 : 3, p);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < Hkv; h++) {
            float *k = m->kb + (size_t)t * kv + h * D;
            rmsnorm(k, k, L->k_norm, D, eps, 1.0f);
            memcpy(m->kraw + (size_t)t * kv + h * D, k, sizeof(float) * D);
            rope(m, k, m->pos + t);
        }
}

/* The query of head h at token t (p1 holds [q | gate] per head), RMS-normed and RoPE'd in place. */
static const float *head_query(Hyla *m, const Layer *L, int t, int h) {
    int H = m->c.n_heads, D = m->c.head_dim;
    float *q = m->p1 + (size_t)t * 2 * H * D + h * 2 * D;
    rmsnorm(q, q, L->q_norm, D, (float)m->c.norm_eps, 1.0f);
    rope(m, q, m->pos + t);
    return q;
}

/* ctx of head h at token t times sigmoid(gate) */
static void gate_head(Hyla *m, int t, int h) {
    int H = m->c.n_heads, D = m->c.head_dim;
    float *o = m->ctx + (size_t)t * H * D + h * D;
    const float *gate = m->p1 + (size_t)t * 2 * H * D + h * 2 * D + D;
    for (int i = 0; i < D; i++) o[i] *= sigmoidf(gate[i]);
}

static void full_attention(Hyla *m, const Layer *L, LayerState *s, int T) {
    const HylaConfig *c = &m->c;
    int H = c->n_heads, D = c->head_dim, kv = c->n_kv_heads * D, group = H / c->n_kv_heads;
    attn_project(m, L, T, 0);
    memcpy(s->k + (size_t)m->pos * kv, m->kb, sizeof(float) * T * kv);
    memcpy(s->v + (size_t)m->pos * kv, m->vb, sizeof(float) * T * kv);
    float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) schedule(dynamic) if ((long)T * H * (m->pos + T) * D >= PAR_MIN_ATTN)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            int kvh = h / group;
            attend(m->ctx + (size_t)t * H * D + h * D, head_query(m, L, t, h), s->k + kvh * D, s->v + kvh * D, kv,
                   m->pos + t + 1, D, scale, thread_scores(m));
            gate_head(m, t, h);
        }
    matmul(m, m->f, m->ctx, T, &L->wo);
}

/* CSA: per token, in order: the local path over the window ring, the compressed path over finished
 * blocks (block j visible at t iff t >= stride (j + 1); none visible -> 0), blended per channel; then
 * the token joins the ring and the pending block, which is compressed when it completes:
 * kc_j = RoPE(compress_k mean(k before RoPE), stride j + stride / 2), vc_j = compress_v mean(v). */
static void csa(Hyla *m, const Layer *L, LayerState *s, int T) {
    const HylaConfig *c = &m->c;
    int H = c->n_heads, D = c->head_dim, Hkv = c->n_kv_heads, kv = Hkv * D, group = H / Hkv;
    int S = c->csa_stride, W = c->csa_window;
    float scale = 1.0f / sqrtf((float)D);
    attn_project(m, L, T, 1);
    for (int t = 0; t < T; t++) {
        int p = m->pos + t, slot = p % W;
        memcpy(s->k + (size_t)slot * kv, m->kb + (size_t)t * kv, sizeof(float) * kv);
        memcpy(s->v + (size_t)slot * kv, m->vb + (size_t)t * kv, sizeof(float) * kv);
        int n_local = p + 1 < W ? p + 1 : W, n_comp = p / S;
#pragma omp parallel for schedule(static) if ((long)H * (n_local + n_comp) * D >= PAR_MIN_ATTN)
        for (int h = 0; h < H; h++) {
            float local[512], comp[512]; /* head_dim <= 512 (checked at load) */
            const float *q = head_query(m, L, t, h);
            int kvh = h / group;
            float *sc = thread_scores(m);
            /* ring slots hold positions p - n_local + 1 .. p; softmax does not depend on their order */
            attend(local, q, s->k + kvh * D, s->v + kvh * D, kv, n_local, D, scale, sc);
            if (n_comp) attend(comp, q, s->kc + kvh * D, s->vc + kvh * D, kv, n_comp, D, scale, sc);
            else memset(comp, 0, sizeof(float) * D);
            float *o = m->ctx + (size_t)t * H * D + h * D;
            const float *b = m->blend + (size_t)t * H * D + h * D;
            for (int i = 0; i < D; i++) o[i] = local[i] + sigmoidf(b[i]) * (comp[i] - local[i]);
            gate_head(m, t, h);
        }
        for (int i = 0; i < kv; i++) {
            s->pend_k[i] += m->kraw[(size_t)t * kv + i];
            s->pend_v[i] += m->vb[(size_t)t * kv + i];
        }
        if (p % S == S - 1) {
            int j = p / S;
            for (int i = 0; i < kv; i++) { s->pend_k[i] /= S; s->pend_v[i] /= S; }
            matmul(m, s->kc + (size_t)j * kv, s->pend_k, 1, &L->compress_k);
            matmul(m, s->vc + (size_t)j * kv, s->pend_v, 1, &L->compress_v);
            for (int h = 0; h < Hkv; h++) rope(m, s->kc + (size_t)j * kv + h * D, S * j + S / 2);
            memset(s->pend_k, 0, sizeof(float) * kv);
            memset(s->pend_v, 0, sizeof(float) * kv);
        }
    }
    matmul(m, m->f, m->ctx, T, &L->wo);
}

/* One token of the delta rule on one head's state S [Dk, Dv] (see gdn below), as
 * one read pass and one update pass: with d = exp(g),
 *   u = beta (v - d S^T k),  o = S_t^T q = d S^T q + (k . q) u,  S_t = d S + k u^T. */
HOT static void gdn_step(float *S, int Dg, const float *q, const float *k, const float *v, float beta, float decay,
                         float *o) {
    float sk[512], sq[512], u[512], kq = 0; /* Dg <= 512 (checked at load) */
    for (int i = 0; i < Dg; i++) kq += k[i] * q[i];
    for (int j = 0; j < Dg; j++) sk[j] = sq[j] = 0;
    for (int i = 0; i < Dg; i++) {
        const float *row = S + (size_t)i * Dg;
        float ki = k[i], qi = q[i];
        for (int j = 0; j < Dg; j++) { sk[j] += row[j] * ki; sq[j] += row[j] * qi; }
    }
    for (int j = 0; j < Dg; j++) {
        u[j] = beta * (v[j] - decay * sk[j]);
        o[j] = decay * sq[j] + kq * u[j];
    }
    for (int i = 0; i < Dg; i++) {
        float *row = S + (size_t)i * Dg, ki = k[i];
        for (int j = 0; j < Dg; j++) row[j] = decay * row[j] + ki * u[j];
    }
}

/* Causal depthwise conv + SiLU of channels [0, n) of x [T, ld] in place, token by token:
 *   y[t, ch] = sum_i w[i, ch] x[t - (K - 1) + i, ch]; hist [K - 1, ld] holds each channel's last K - 1 inputs. */
HOT static void conv_silu(float *x, int ld, int T, int n, int K, float *hist, const float *w) {
    float acc[64]; /* n <= 64 */
    for (int t = 0; t < T; t++) {
        float *xt = x + (size_t)t * ld;
        for (int c = 0; c < n; c++) acc[c] = w[(size_t)(K - 1) * ld + c] * xt[c];
        for (int i = 0; i < K - 1; i++)
            for (int c = 0; c < n; c++) acc[c] += w[(size_t)i * ld + c] * hist[(size_t)i * ld + c];
        for (int i = 0; i + 1 < K - 1; i++)
            for (int c = 0; c < n; c++) hist[(size_t)i * ld + c] = hist[(size_t)(i + 1) * ld + c];
        for (int c = 0; c < n; c++) {
            hist[(size_t)(K - 2) * ld + c] = xt[c];
            xt[c] = siluf(acc[c]);
        }
    }
}

/* Gated DeltaNet: causal depthwise conv + SiLU over q|k|v, then per head the gated delta rule
 *   S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,  o_t = S_t^T q_t / sqrt(Dk)
 * with L2-normed q, k, g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b); output
 * w * rmsnorm(o) * silu(z) per head, then out_proj. */
/* Everything of one head after the input projections, for T tokens: conv + SiLU of its q, k, v
 * channels, L2-normed q and k, beta and the decay, the delta rule, w * rmsnorm(o) * silu(z) into ctx. */
static void gdn_head(Hyla *m, const Layer *L, LayerState *s, int T, int h) {
    const HylaConfig *c = &m->c;
    int Hg = c->gdn_heads, Dg = c->gdn_head_dim, HD = Hg * Dg, C = 3 * HD, K = c->gdn_conv;
    float *qkv = m->p1, *z = m->p2, *b = m->ba, *a = m->ba + (size_t)T * Hg;
    for (int part = 0; part < 3; part++) /* q, k, v */
        for (int c0 = part * HD + h * Dg; c0 < part * HD + (h + 1) * Dg; c0 += 64) {
            int n = part * HD + (h + 1) * Dg - c0 < 64 ? part * HD + (h + 1) * Dg - c0 : 64;
            conv_silu(qkv + c0, C, T, n, K, s->conv + c0, s->convw + c0);
        }
    float qscale = 1.0f / sqrtf((float)Dg), eps = (float)c->norm_eps, decay_rate = expf(L->A_log[h]);
    for (int t = 0; t < T; t++) {
        float *q = qkv + (size_t)t * C + h * Dg, *k = q + HD, qq = 0, kk = 0;
#pragma omp simd reduction(+ : qq, kk)
        for (int i = 0; i < Dg; i++) { qq += q[i] * q[i]; kk += k[i] * k[i]; }
        float qn = qscale / sqrtf(qq + L2_EPS), kn = 1.0f / sqrtf(kk + L2_EPS);
        for (int i = 0; i < Dg; i++) { q[i] *= qn; k[i] *= kn; }
        float beta = sigmoidf(b[(size_t)t * Hg + h]);
        float decay = expf(-decay_rate * softplusf(a[(size_t)t * Hg + h] + L->dt_bias[h]));
        float *o = m->ctx + (size_t)t * HD + h * Dg, ss = 0;
        gdn_step(s->S + (size_t)h * Dg * Dg, Dg, q, k, q + 2 * HD, beta, decay, o);
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < Dg; j++) ss += o[j] * o[j];
        float inv = 1.0f / sqrtf(ss / Dg + eps);
        const float *zz = z + (size_t)t * HD + h * Dg;
        for (int j = 0; j < Dg; j++) o[j] = L->gnorm[j] * (o[j] * inv) * siluf(zz[j]);
    }
}

static void gdn(Hyla *m, const Layer *L, LayerState *s, int T) {
    const HylaConfig *c = &m->c;
    int Hg = c->gdn_heads, Dg = c->gdn_head_dim;
    float *b = m->ba, *a = m->ba + (size_t)T * Hg;
    Product p[4] = {{m->p1, &L->in_qkv}, {m->p2, &L->in_z}, {b, &L->in_b}, {a, &L->in_a}};
    matmuls(m, m->xn, T, 4, p);
    /* one parallel loop over heads for all the rest (with 9 heads on 2 threads the split is 5 / 4, but
     * nothing between the projections runs on one thread) */
#pragma omp parallel for schedule(static) if ((long)Hg * Dg * Dg * T >= PAR_MIN / 2)
    for (int h = 0; h < Hg; h++) gdn_head(m, L, s, T, h);
    matmul(m, m->f, m->ctx, T, &L->out_proj);
}

/* SwiGLU FFN in one parallel region: each thread computes its rows of w1 x and w3 x and their
 * silu(a) * b, then (after one barrier and the quantization of the hidden vector) its rows of w2. */
static void ffn(Hyla *m, const Layer *L, int T) {
    int F = m->c.ffn_hidden;
    Product up[2] = {{m->p1, &L->w1}, {m->p2, &L->w3}}, down = {m->f, &L->w2};
    quantize_input(m, m->xn, T, &L->w1);
#pragma omp parallel if (product_work(T, 2, up) >= PAR_MIN)
    {
        products_share(m, m->xn, T, 2, up);
        int r0, r1; /* w1 and w3 have the same rows, so the same share */
        row_share(&L->w1, &r0, &r1);
        for (int t = 0; t < T; t++)
            for (int r = r0; r < r1; r++) m->p1[(size_t)t * F + r] = siluf(m->p1[(size_t)t * F + r]) * m->p2[(size_t)t * F + r];
#pragma omp barrier
#pragma omp single
        quantize_input(m, m->p1, T, &L->w2);
        products_share(m, m->p1, T, 1, &down);
    }
}

/* x = (1 + r) x + (1 + s) f, or x + f without hyper-connections */
static void residual(Hyla *m, const float *r, const float *s, int T) {
    int d = m->c.dim;
    for (int t = 0; t < T; t++) {
        float *x = m->x + (size_t)t * d;
        const float *f = m->f + (size_t)t * d;
        if (r)
            for (int i = 0; i < d; i++) x[i] = (1.0f + r[i]) * x[i] + (1.0f + s[i]) * f[i];
        else
            for (int i = 0; i < d; i++) x[i] += f[i];
    }
}

static void embed_row(const Hyla *m, float *x, int token) {
    const Mat *E = &m->emb;
    int d = E->cols;
    if (E->dtype == DT_F32) {
        memcpy(x, E->f + (size_t)token * d, sizeof(float) * d);
        return;
    }
    for (int i = 0; i < d; i++) x[i] = q8_weight(E, token, i);
}

static void forward_chunk(Hyla *m, const int *tokens, int T, float *logits, int all_logits) {
    const HylaConfig *c = &m->c;
    int d = c->dim;
    float eps = (float)c->norm_eps;
    for (int t = 0; t < T; t++) embed_row(m, m->x + (size_t)t * d, tokens[t]);
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        LayerState *s = &m->st[l];
        for (int t = 0; t < T; t++) rmsnorm(m->xn + (size_t)t * d, m->x + (size_t)t * d, L->attn_norm, d, eps, 1.0f);
        if (c->layer_types[l] == HYLA_GDN) gdn(m, L, s, T);
        else if (c->layer_types[l] == HYLA_CSA) csa(m, L, s, T);
        else full_attention(m, L, s, T);
        residual(m, c->hyper_connections ? L->hc[0] : NULL, c->hyper_connections ? L->hc[1] : NULL, T);
        for (int t = 0; t < T; t++) rmsnorm(m->xn + (size_t)t * d, m->x + (size_t)t * d, L->ffn_norm, d, eps, 1.0f);
        ffn(m, L, T);
        residual(m, c->hyper_connections ? L->hc[2] : NULL, c->hyper_connections ? L->hc[3] : NULL, T);
    }
    m->pos += T;
    if (!logits) return;
    int first = all_logits ? 0 : T - 1;
    for (int t = first; t < T; t++) rmsnorm(m->xn + (size_t)t * d, m->x + (size_t)t * d, m->final_norm, d, eps, 1.0f);
    matmul(m, logits, m->xn + (size_t)first * d, T - first, &m->emb); /* tied head */
}

int hyla_forward(Hyla *m, const int *tokens, int n, float *logits, int all_logits) {
    const HylaConfig *c = &m->c;
    if (n <= 0) return fail(m->err, sizeof m->err, "no tokens given");
    if ((long)m->pos + n > c->max_seq_len)
        return fail(m->err, sizeof m->err, "%d tokens at position %d exceed the context of %d", n, m->pos, c->max_seq_len);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return fail(m->err, sizeof m->err, "token id %d at index %d is out of range [0, %d)", tokens[i], i, c->vocab_size);
    for (int i = 0; i < n; i += CHUNK) {
        int T = n - i < CHUNK ? n - i : CHUNK, last = i + T == n;
        float *out = !logits ? NULL : all_logits ? logits + (size_t)i * c->vocab_size : last ? logits : NULL;
        forward_chunk(m, tokens + i, T, out, all_logits);
    }
    return 0;
}

/* ----------------------------------------------------------------------------- read bandwidth */

HOT static uint64_t sum_words(const uint64_t *p, size_t n) {
    uint64_t a[8] = {0}; /* independent sums: the loop is bound by the loads, not by an add chain */
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) a[j] += p[i + j];
    for (; i < n; i++) a[0] += p[i];
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

double hyla_read_bandwidth(size_t bytes, int passes) {
    size_t n = bytes / 8;
    uint64_t *buf = mmap(NULL, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!n || passes <= 0 || buf == MAP_FAILED) return -1;
#ifdef MADV_HUGEPAGE
    madvise(buf, n * 8, MADV_HUGEPAGE);
#endif
    for (size_t i = 0; i < n; i++) buf[i] = i;
    double best = INFINITY;
    volatile uint64_t sink = 0;
    for (int rep = 0; rep < passes; rep++) {
        struct timespec t0, t1;
        uint64_t total = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
#pragma omp parallel reduction(+ : total)
        {
#ifdef _OPENMP
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
            int nt = 1, id = 0;
#endif
            size_t lo = n * id / nt, hi = n * (id + 1) / nt;
            total += sum_words(buf + lo, hi - lo);
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        sink += total;
        double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        best = dt < best ? dt : best;
    }
    (void)sink;
    munmap(buf, n * 8);
    return (double)(n * 8) / best;
}

/* ----------------------------------------------------------------------------- sampling */

int hyla_sampler_init(HylaSampler *s, int vocab, float temperature, float top_p, uint64_t seed) {
    s->temperature = temperature;
    s->top_p = top_p;
    s->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    s->vocab = vocab;
    s->probs = malloc(sizeof(float) * vocab);
    s->order = malloc(sizeof(int) * vocab);
    return !s->probs || !s->order;
}

void hyla_sampler_free(HylaSampler *s) {
    free(s->probs);
    free(s->order);
    s->probs = NULL;
    s->order = NULL;
}

static float rng_uniform(uint64_t *state) { /* xorshift64*, 24 random bits in [0, 1) */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static const float *sort_key;
static int by_prob_desc(const void *a, const void *b) {
    float pa = sort_key[*(const int *)a], pb = sort_key[*(const int *)b];
    return (pa < pb) - (pa > pb);
}

int hyla_sample(HylaSampler *s, const float *logits) {
    int n = s->vocab, best = 0;
    for (int i = 1; i < n; i++) best = logits[i] > logits[best] ? i : best;
    if (s->temperature <= 0) return best;
    float sum = 0;
    for (int i = 0; i < n; i++) sum += s->probs[i] = expf((logits[i] - logits[best]) / s->temperature);
    for (int i = 0; i < n; i++) s->probs[i] /= sum;
    float u = rng_uniform(&s->rng);
    if (s->top_p <= 0 || s->top_p >= 1) {
        float cdf = 0;
        for (int i = 0; i < n; i++)
            if (u < (cdf += s->probs[i])) return i;
        return best;
    }
    /* nucleus: the smallest set of most likely tokens with mass >= top_p; tokens below
     * (1 - top_p) / (n - 1) can never be in it, which keeps the sort short */
    float cutoff = (1.0f - s->top_p) / (n - 1);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (s->probs[i] >= cutoff) s->order[m++] = i;
    sort_key = s->probs;
    qsort(s->order, m, sizeof(int), by_prob_desc);
    float mass = 0;
    int last = m - 1;
    for (int i = 0; i < m; i++) {
        mass += s->probs[s->order[i]];
        if (mass >= s->top_p) { last = i; break; }
    }
    float r = u * mass, cdf = 0;
    for (int i = 0; i <= last; i++)
        if (r < (cdf += s->probs[s->order[i]])) return s->order[i];
    return s->order[last];
}

int hyla_generate(Hyla *m, HylaSampler *s, const int *prompt, int n_prompt, int max_new, int stop_id, int *out) {
    float *logits = malloc(sizeof(float) * m->c.vocab_size);
    if (!logits) return fail(m->err, sizeof m->err, "out of memory"), -1;
    int n = 0;
    if (hyla_forward(m, prompt, n_prompt, logits, 0)) { free(logits); return -1; }
    int room = m->c.max_seq_len - m->pos; /* as train/generate.py */
    if (max_new > room) max_new = room;
    while (n < max_new) {
        int next = hyla_sample(s, logits);
        out[n++] = next;
        if (next == stop_id || n == max_new) break;
        if (hyla_forward(m, &next, 1, logits, 0)) { free(logits); return -1; }
    }
    free(logits);
    return n;
}

/* ----------------------------------------------------------------------------- tokenizer */

enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_BYTE = 6 };

struct HylaTokenizer {
    int vocab, bos, eos, unk, flags, max_len;
    char **piece;
    int *len;
    float *score;
    uint8_t *type;
    int byte_id[256];
    int *slots; /* open-addressing hash of normal pieces -> id */
    uint32_t mask;
};

static uint32_t hash_bytes(const char *s, int n) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int lookup(const HylaTokenizer *t, const char *s, int n) {
    for (uint32_t i = hash_bytes(s, n) & t->mask;; i = (i + 1) & t->mask) {
        int id = t->slots[i];
        if (id < 0) return -1;
        if (t->len[id] == n && !memcmp(t->piece[id], s, n)) return id;
    }
}

void hyla_tokenizer_free(HylaTokenizer *t) {
    if (!t) return;
    if (t->piece)
        for (int i = 0; i < t->vocab; i++) free(t->piece[i]);
    free(t->piece); free(t->len); free(t->score); free(t->type); free(t->slots);
    free(t);
}

int hyla_tokenizer_load(HylaTokenizer **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    crc_init();
    FILE *fh = fopen(path, "rb");
    if (!fh) return fail(err, errlen, "cannot open %s: %s", path, strerror(errno));
    fseek(fh, 0, SEEK_END);
    long size = ftell(fh);
    fseek(fh, 0, SEEK_SET);
    uint8_t *buf = size > 0 ? malloc(size) : NULL;
    if (!buf || fread(buf, 1, size, fh) != (size_t)size) {
        fclose(fh); free(buf);
        return fail(err, errlen, "cannot read %s", path);
    }
    fclose(fh);
    uint32_t f[8];
    if (size < 40 || memcmp(buf, "HYLATOK1", 8)) { free(buf); return fail(err, errlen, "%s is not a hyla tokenizer file", path); }
    memcpy(f, buf + 8, sizeof f);
    uint32_t crc_saved = f[7];
    memset(buf + 36, 0, 4);
    uint32_t crc = crc32_update(0, buf, 36);
    crc = crc32_update(crc, buf + 40, size - 40);
    if (f[0] != 1) { free(buf); return fail(err, errlen, "%s: tokenizer format version %u, expected 1", path, f[0]); }
    if (crc != crc_saved) { free(buf); return fail(err, errlen, "%s: tokenizer checksum mismatch (corrupt file)", path); }
    HylaTokenizer *t = calloc(1, sizeof *t);
    int e = !t;
    if (!e) {
        t->vocab = (int)f[1]; t->bos = (int)f[2]; t->eos = (int)f[3]; t->unk = (int)f[4]; t->flags = (int)f[5];
        t->max_len = (int)f[6];
        e = t->vocab <= 0 || t->vocab > (1 << 24) || t->bos >= t->vocab || t->eos >= t->vocab || t->unk >= t->vocab;
    }
    if (!e) {
        uint32_t n = 1;
        while (n < 2u * t->vocab) n <<= 1;
        t->mask = n - 1;
        t->piece = calloc(t->vocab, sizeof(char *));
        t->len = calloc(t->vocab, sizeof(int));
        t->score = calloc(t->vocab, sizeof(float));
        t->type = calloc(t->vocab, 1);
        t->slots = malloc(sizeof(int) * n);
        e = !t->piece || !t->len || !t->score || !t->type || !t->slots;
        if (!e) memset(t->slots, 0xFF, sizeof(int) * n);
        for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    }
    size_t off = 40;
    for (int i = 0; !e && i < t->vocab; i++) {
        uint16_t n;
        if (off + 7 > (size_t)size) { e = 1; break; }
        memcpy(&t->score[i], buf + off, 4);
        t->type[i] = buf[off + 4];
        memcpy(&n, buf + off + 5, 2);
        off += 7;
        if (off + n > (size_t)size || n > t->max_len || !(t->piece[i] = malloc(n + 1))) { e = 1; break; }
        memcpy(t->piece[i], buf + off, n);
        t->piece[i][n] = 0;
        t->len[i] = n;
        off += n;
        if (t->type[i] == PIECE_NORMAL) {
            uint32_t k = hash_bytes(t->piece[i], n) & t->mask;
            while (t->slots[k] >= 0) k = (k + 1) & t->mask;
            t->slots[k] = i;
        } else if (t->type[i] == PIECE_BYTE) {
            unsigned v;
            if (n == 6 && sscanf(t->piece[i], "<0x%2X>", &v) == 1) t->byte_id[v] = i;
        }
    }
    free(buf);
    if (e || off != (size_t)size) {
        hyla_tokenizer_free(t);
        return fail(err, errlen, "%s: corrupt or truncated tokenizer", path);
    }
    *out = t;
    return 0;
}

int hyla_tokenizer_vocab(const HylaTokenizer *t) { return t->vocab; }
int hyla_tokenizer_bos(const HylaTokenizer *t) { return t->bos; }
int hyla_tokenizer_eos(const HylaTokenizer *t) { return t->eos; }
int hyla_tokenizer_max_piece(const HylaTokenizer *t) { return t->max_len; }

/* SentencePiece BPE: normalize (drop extra spaces if the model does, dummy prefix, ' ' -> U+2581),
 * split into characters, then repeatedly merge the adjacent pair whose concatenation is the
 * highest-scoring piece (the leftmost on ties); characters outside the vocabulary become byte pieces. */
int hyla_encode(const HylaTokenizer *t, const char *text, int bos, int eos, int *ids) {
    size_t n = strlen(text);
    char *norm = malloc(3 * n + 4); /* every byte may become the 3-byte U+2581 */
    int *start = malloc(sizeof(int) * (3 * n + 4)), *slen = malloc(sizeof(int) * (3 * n + 4));
    int *sid = malloc(sizeof(int) * (3 * n + 4));
    char *tmp = malloc(2 * (size_t)t->max_len + 8);
    if (!norm || !start || !slen || !sid || !tmp) {
        free(norm); free(start); free(slen); free(sid); free(tmp);
        return -1;
    }
    size_t a = 0, b = n;
    if (t->flags & 2) {
        while (a < b && text[a] == ' ') a++;
        while (b > a && text[b - 1] == ' ') b--;
    }
    size_t m = 0;
    if ((t->flags & 1) && a < b) memcpy(norm + m, "\xe2\x96\x81", 3), m += 3;
    for (size_t i = a; i < b; i++) {
        if (text[i] == ' ') {
            if ((t->flags & 2) && i > a && text[i - 1] == ' ') continue;
            memcpy(norm + m, "\xe2\x96\x81", 3), m += 3;
        } else {
            norm[m++] = text[i];
        }
    }
    int ns = 0; /* symbols: one per UTF-8 character */
    for (size_t i = 0; i < m;) {
        uint8_t c0 = (uint8_t)norm[i];
        int len = c0 < 0x80 ? 1 : c0 >> 5 == 6 ? 2 : c0 >> 4 == 14 ? 3 : c0 >> 3 == 30 ? 4 : 1;
        if (i + len > m) len = 1;
        for (int k = 1; k < len; k++)
            if (((uint8_t)norm[i + k] & 0xC0) != 0x80) len = 1;
        start[ns] = (int)i;
        slen[ns] = len;
        sid[ns] = lookup(t, norm + i, len);
        ns++;
        i += len;
    }
    for (;;) {
        float best = -INFINITY;
        int at = -1, id = -1;
        for (int i = 0; i + 1 < ns; i++) {
            if (sid[i] < 0 || sid[i + 1] < 0 || slen[i] + slen[i + 1] > t->max_len) continue;
            memcpy(tmp, norm + start[i], slen[i]);
            memcpy(tmp + slen[i], norm + start[i + 1], slen[i + 1]);
            int j = lookup(t, tmp, slen[i] + slen[i + 1]);
            if (j >= 0 && t->score[j] > best) { best = t->score[j]; at = i; id = j; }
        }
        if (at < 0) break;
        sid[at] = id;
        slen[at] += slen[at + 1];
        memmove(start + at + 1, start + at + 2, sizeof(int) * (ns - at - 2));
        memmove(slen + at + 1, slen + at + 2, sizeof(int) * (ns - at - 2));
        memmove(sid + at + 1, sid + at + 2, sizeof(int) * (ns - at - 2));
        ns--;
    }
    int count = 0;
    if (bos) ids[count++] = t->bos;
    for (int i = 0; i < ns; i++) {
        if (sid[i] >= 0) { ids[count++] = sid[i]; continue; }
        for (int k = 0; k < slen[i]; k++) {
            int byte = (uint8_t)norm[start[i] + k], id = (t->flags & 4) ? t->byte_id[byte] : -1;
            ids[count++] = id >= 0 ? id : t->unk;
            if (id < 0) break; /* without byte fallback an unknown character is one <unk> */
        }
    }
    if (eos) ids[count++] = t->eos;
    free(norm); free(start); free(slen); free(sid); free(tmp);
    return count;
}

int hyla_decode_piece(const HylaTokenizer *t, int prev, int id, char *buf) {
    if (id < 0 || id >= t->vocab) return -1;
    int n = 0;
    if (t->type[id] == PIECE_BYTE) {
        unsigned v;
        if (sscanf(t->piece[id], "<0x%2X>", &v) == 1) buf[n++] = (char)v;
    } else if (t->type[id] == PIECE_UNKNOWN) {
        n = snprintf(buf, 8, " \xe2\x81\x87 ");
    } else if (t->type[id] != PIECE_CONTROL) {
        const char *p = t->piece[id];
        for (int i = 0; i < t->len[id];) {
            if (i + 3 <= t->len[id] && !memcmp(p + i, "\xe2\x96\x81", 3)) buf[n++] = ' ', i += 3;
            else buf[n++] = p[i++];
        }
        if ((t->flags & 1) && (prev == t->bos || prev < 0) && n && buf[0] == ' ') memmove(buf, buf + 1, --n);
    }
    buf[n] = 0;
    return n;
}
