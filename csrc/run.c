/* run: generate text or chat with a hyla model exported by `hyla export`.
 *
 *   ./run model.bin -i "Once upon a time" -n 200 -t 0.8 -p 0.9
 *   ./run model.bin -m chat -y "You are a helpful assistant."
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hyla.h"

static void usage(void) {
    fprintf(stderr,
            "usage: run model.bin [options]\n"
            "  -z <path>   tokenizer.bin (default: tokenizer.bin beside model.bin)\n"
            "  -i <text>   prompt (generate mode)\n"
            "  -n <int>    tokens to generate (default 256, bounded by the context)\n"
            "  -t <float>  temperature, 0 = greedy (default 0.8)\n"
            "  -p <float>  top-p (default 0.9)\n"
            "  -s <int>    random seed (default: time)\n"
            "  -T <int>    threads (default: OpenMP's)\n"
            "  -m <mode>   generate | chat (default generate)\n"
            "  -y <text>   system prompt (chat mode)\n");
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    Hyla *m;
    HylaTokenizer *tok;
    HylaSampler sampler;
    float *logits;
    char *piece;
} Run;

/* Feed `ids` (n tokens), then sample up to `steps` tokens, printing them; stops at EOS. Returns the
 * number of tokens generated, or -1 on error. */
static int continue_text(Run *r, const int *ids, int n, int steps, double *decode_s) {
    const HylaConfig *c = hyla_config(r->m);
    if (hyla_pos(r->m) + n > c->max_seq_len) {
        fprintf(stderr, "error: the prompt has %d tokens at position %d, the context is %d\n", n, hyla_pos(r->m),
                c->max_seq_len);
        return -1;
    }
    if (hyla_forward(r->m, ids, n, r->logits, 0)) {
        fprintf(stderr, "error: %s\n", hyla_error(r->m));
        return -1;
    }
    int prev = ids[n - 1], done = 0;
    double t0 = now_s();
    while (done < steps) {
        int next = hyla_sample(&r->sampler, r->logits);
        done++;
        if (next == hyla_tokenizer_eos(r->tok)) break;
        int len = hyla_decode_piece(r->tok, prev, next, r->piece);
        if (len > 0) fwrite(r->piece, 1, len, stdout);
        fflush(stdout);
        prev = next;
        if (hyla_pos(r->m) >= c->max_seq_len) break;
        if (hyla_forward(r->m, &next, 1, r->logits, 0)) {
            fprintf(stderr, "error: %s\n", hyla_error(r->m));
            return -1;
        }
    }
    *decode_s += now_s() - t0;
    return done;
}

static int encode(Run *r, const char *text, int *ids) { return hyla_encode(r->tok, text, 1, 0, ids); }

static int generate_mode(Run *r, const char *prompt, int steps) {
    int *ids = malloc(sizeof(int) * (strlen(prompt) + 3));
    if (!ids) return 1;
    int n = encode(r, prompt, ids), context = hyla_config(r->m)->max_seq_len;
    if (n > context) {
        fprintf(stderr, "error: the prompt has %d tokens, the context is %d\n", n, context);
        free(ids);
        return 1;
    }
    double t0 = now_s(), decode_s = 0;
    fputs(prompt, stdout);
    int done = n > 0 ? continue_text(r, ids, n, steps, &decode_s) : -1;
    free(ids);
    if (done < 0) return 1;
    double total = now_s() - t0;
    printf("\n");
    fprintf(stderr, "prompt %d tokens, generated %d in %.2f s (prefill %.1f tok/s, decode %.1f tok/s)\n", n, done,
            total, n / (total - decode_s + 1e-9), done / (decode_s + 1e-9));
    return 0;
}

/* Llama 2 chat template: [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] for the first turn,
 * [INST] {user} [/INST] after; each turn starts with BOS, the answer ends at EOS. */
static int chat_mode(Run *r, const char *system, int steps) {
    char user[4096];
    int turn = 0;
    double decode_s = 0;
    for (;;) {
        printf("User: ");
        fflush(stdout);
        if (!fgets(user, sizeof user, stdin)) return 0;
        user[strcspn(user, "\n")] = 0;
        size_t len = strlen(user) + (system ? strlen(system) : 0) + 64;
        char *text = malloc(len);
        int *ids = malloc(sizeof(int) * (len + 3));
        if (!text || !ids) { free(text); free(ids); return 1; }
        if (turn == 0 && system && *system)
            snprintf(text, len, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
        else
            snprintf(text, len, "[INST] %s [/INST]", user);
        int n = encode(r, text, ids);
        printf("Assistant:");
        int done = n > 0 ? continue_text(r, ids, n, steps, &decode_s) : -1;
        free(text);
        free(ids);
        if (done < 0) return 1;
        printf("\n");
        turn++;
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') { usage(); return 1; }
    const char *model_path = argv[1], *tok_path = NULL, *prompt = "", *mode = "generate", *system = NULL;
    int steps = 256, threads = 0;
    float temperature = 0.8f, top_p = 0.9f;
    unsigned long long seed = (unsigned long long)time(NULL);
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) { usage(); return 1; }
        const char *v = argv[i + 1];
        char *end;
        switch (argv[i][1]) {
        case 'z': tok_path = v; break;
        case 'i': prompt = v; break;
        case 'm': mode = v; break;
        case 'y': system = v; break;
        case 'n': steps = (int)strtol(v, &end, 10); if (*end || steps < 0) { usage(); return 1; } break;
        case 'T': threads = (int)strtol(v, &end, 10); if (*end || threads < 0) { usage(); return 1; } break;
        case 's': seed = strtoull(v, &end, 10); if (*end) { usage(); return 1; } break;
        case 't': temperature = strtof(v, &end); if (*end || temperature < 0) { usage(); return 1; } break;
        case 'p': top_p = strtof(v, &end); if (*end || top_p < 0 || top_p > 1) { usage(); return 1; } break;
        default: usage(); return 1;
        }
    }
    if (strcmp(mode, "generate") && strcmp(mode, "chat")) { usage(); return 1; }
    char default_tok[4096];
    if (!tok_path) {
        const char *slash = strrchr(model_path, '/');
        int dir = slash ? (int)(slash - model_path + 1) : 0;
        snprintf(default_tok, sizeof default_tok, "%.*stokenizer.bin", dir, model_path);
        tok_path = default_tok;
    }
    char err[512];
    Run r = {0};
    hyla_set_threads(threads);
    if (hyla_load(&r.m, model_path, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); return 1; }
    if (hyla_tokenizer_load(&r.tok, tok_path, err, sizeof err)) {
        fprintf(stderr, "error: %s\n", err);
        hyla_free(r.m);
        return 1;
    }
    int rc = 1;
    const HylaConfig *c = hyla_config(r.m);
    if (hyla_tokenizer_vocab(r.tok) != c->vocab_size) {
        fprintf(stderr, "error: tokenizer has %d pieces, the model %d\n", hyla_tokenizer_vocab(r.tok), c->vocab_size);
    } else if (hyla_sampler_init(&r.sampler, c->vocab_size, temperature, top_p, seed) ||
               !(r.logits = malloc(sizeof(float) * c->vocab_size)) ||
               !(r.piece = malloc(2 * hyla_tokenizer_max_piece(r.tok) + 16))) {
        fprintf(stderr, "error: out of memory\n");
    } else {
        rc = strcmp(mode, "chat") ? generate_mode(&r, prompt, steps) : chat_mode(&r, system, steps);
    }
    hyla_sampler_free(&r.sampler);
    free(r.logits);
    free(r.piece);
    hyla_tokenizer_free(r.tok);
    hyla_free(r.m);
    return rc;
}
