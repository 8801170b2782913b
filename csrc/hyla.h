/* hyla: CPU inference for the hybrid GDN + CSA + full-attention LM (shared/spec/hybrid-95m.md).
 *
 * One sequence per engine. Weights are read from model.bin (train/export.py documents the format):
 * fp32 and int8 group-quantized matrices. Every function that can fail returns 0 on success and a
 * non-zero code otherwise, with a message in hyla_error() / the `err` buffer; nothing aborts.
 *
 *   Hyla *m; char err[512];
 *   if (hyla_load(&m, "model.bin", err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
 *   hyla_forward(m, ids, n, logits, 0);    // prefill: logits of the last token, [vocab]
 *   hyla_forward(m, &next, 1, logits, 0);  // one decoding step
 */
#ifndef HYLA_H
#define HYLA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { HYLA_GDN = 0, HYLA_CSA = 1, HYLA_FULL = 2 };

typedef struct {
    int vocab_size, dim, n_layers, max_seq_len;
    int n_heads, n_kv_heads, head_dim, rotary_dim;
    int csa_stride, csa_window;
    int gdn_heads, gdn_head_dim, gdn_conv;
    int ffn_hidden, hyper_connections, quant_group;
    double norm_eps, rope_theta, rope_fraction;
    uint8_t layer_types[256];
} HylaConfig;

typedef struct Hyla Hyla;
typedef struct HylaTokenizer HylaTokenizer;

int hyla_load(Hyla **out, const char *path, char *err, size_t errlen);
void hyla_free(Hyla *m);
const HylaConfig *hyla_config(const Hyla *m);
const char *hyla_error(const Hyla *m);
int hyla_pos(const Hyla *m);     /* tokens consumed since the last reset */
int hyla_is_quantized(const Hyla *m);
void hyla_reset(Hyla *m);        /* forget the sequence (all caches) */
void hyla_set_threads(int n);    /* OpenMP threads; <= 0 keeps the default */
/* Run n tokens at the current position (a batched prefill for n > 1). logits: [n, vocab] when
 * all_logits, else [vocab] for the last token; may be NULL. Fails (state unchanged) on token ids out of
 * range or when the context would overflow. */
int hyla_forward(Hyla *m, const int *tokens, int n, float *logits, int all_logits);

/* Bytes per second of the best of `passes` reads of a `bytes` buffer (huge pages, each OpenMP thread
 * summing a contiguous range, as decoding streams weights): the read bandwidth the engine can hope
 * for with the current thread count. -1 if the buffer cannot be allocated. */
double hyla_read_bandwidth(size_t bytes, int passes);

/* Sampling: greedy at temperature <= 0, else top-p (nucleus) sampling with an xorshift RNG. */
typedef struct {
    float temperature, top_p;
    uint64_t rng;
    float *probs;
    int *order;
    int vocab;
} HylaSampler;
int hyla_sampler_init(HylaSampler *s, int vocab, float temperature, float top_p, uint64_t seed);
void hyla_sampler_free(HylaSampler *s);
int hyla_sample(HylaSampler *s, const float *logits);
/* Continue the current sequence from `prompt` (n_prompt >= 1 tokens): writes up to max_new tokens to
 * out and returns how many (stops after stop_id when stop_id >= 0, or at the context), -1 on error. */
int hyla_generate(Hyla *m, HylaSampler *s, const int *prompt, int n_prompt, int max_new, int stop_id, int *out);

/* SentencePiece BPE tokenizer from tokenizer.bin (train/export.py). */
int hyla_tokenizer_load(HylaTokenizer **out, const char *path, char *err, size_t errlen);
void hyla_tokenizer_free(HylaTokenizer *t);
int hyla_tokenizer_vocab(const HylaTokenizer *t);
int hyla_tokenizer_bos(const HylaTokenizer *t);
int hyla_tokenizer_eos(const HylaTokenizer *t);
/* Encode UTF-8 text; ids needs room for strlen(text) + 3 entries. Returns the count, -1 on error. */
int hyla_encode(const HylaTokenizer *t, const char *text, int bos, int eos, int *ids);
/* Bytes of token `id` as text (byte pieces as their raw byte, '\xe2\x96\x81' as a space, the leading
 * space dropped after BOS); writes to buf (>= 2 * max piece + 1 bytes), returns the length, -1 if bad id. */
int hyla_decode_piece(const HylaTokenizer *t, int prev, int id, char *buf);
int hyla_tokenizer_max_piece(const HylaTokenizer *t);

#ifdef __cplusplus
}
#endif
#endif
