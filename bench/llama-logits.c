// llama.cpp's logits for a sequence of token ids, for bench/vs-llama-logits.sh.
//
//   llama-logits MODEL.gguf IDS THREADS OUT.f32 [f32|f16]
//
// IDS is a comma-separated list. The ids run as one batch from position 0
// on the CPU, with logits asked for at every position; OUT gets them as
// raw little-endian f32, one row of n_vocab per position, and the vocabulary
// size is printed on stdout. The last argument is the KV cache's type:
// f16, llama.cpp's default (keys and values rounded to half precision,
// attention as it picks), or f32 (the default here), with flash attention
// off: what smoe computes, f32 keys and values and a plain softmax. Written against libllama's C API as the
// bench's llama.cpp (llama-cpp-python's vendored copy) has it.
//
// With LLAMA_LOGITS_DUMP=DIR, every named contiguous f32 or i32 tensor of
// the graph (llama.cpp's names: `attn_norm-0`, `ffn_moe_topk-3`,
// `l_out-7`, `result_norm`, ...) is written to DIR/NAME as raw
// little-endian values as it is computed, and DIR/index lists
// `NAME TYPE NE0 NE1 NE2 NE3`, ne0 fastest: to find the first tensor where
// smoe and llama.cpp part.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"

struct dump {
    const char *dir;
    FILE *index;
};

static bool dump_tensor(struct ggml_tensor *t, bool ask, void *user) {
    struct dump *d = user;
    int wanted = t->name[0] != '\0' && strchr(t->name, '/') == NULL && ggml_is_contiguous(t) &&
                 (t->type == GGML_TYPE_F32 || t->type == GGML_TYPE_I32);
    if (ask || !wanted) return wanted;
    size_t bytes = ggml_nbytes(t);
    void *data = malloc(bytes);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", d->dir, t->name);
    FILE *f = fopen(path, "wb");
    if (!data || !f) {
        perror(path);
        exit(1);
    }
    ggml_backend_tensor_get(t, data, 0, bytes);
    if (fwrite(data, 1, bytes, f) != bytes) {
        perror(path);
        exit(1);
    }
    fclose(f);
    free(data);
    fprintf(d->index, "%s %s %lld %lld %lld %lld\n", t->name, ggml_type_name(t->type), (long long)t->ne[0],
            (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3]);
    return true;
}

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS THREADS OUT.f32 [f32|f16]\n", argv[0]);
        return 2;
    }
    int cap = 16, n = 0;
    llama_token *ids = malloc(cap * sizeof *ids);
    for (char *s = strtok(argv[2], ","); s; s = strtok(NULL, ",")) {
        if (n == cap) ids = realloc(ids, (cap *= 2) * sizeof *ids);
        ids[n++] = (llama_token)atoi(s);
    }
    int threads = atoi(argv[3]);
    if (n == 0 || threads < 1) {
        fprintf(stderr, "need at least one id and one thread\n");
        return 2;
    }

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    if (argc == 5 || strcmp(argv[5], "f32") == 0) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    } else if (strcmp(argv[5], "f16") != 0) {
        fprintf(stderr, "KV type %s: expected f32 or f16\n", argv[5]);
        return 2;
    }
    struct dump dump = {getenv("LLAMA_LOGITS_DUMP"), NULL};
    if (dump.dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/index", dump.dir);
        if (!(dump.index = fopen(path, "w"))) {
            perror(path);
            return 1;
        }
        cp.cb_eval = dump_tensor;
        cp.cb_eval_user_data = &dump;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot make a context of %d tokens\n", n);
        return 1;
    }

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }

    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE *out = fopen(argv[4], "wb");
    if (!out) {
        perror(argv[4]);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        if (fwrite(llama_get_logits_ith(ctx, i), sizeof(float), vocab, out) != (size_t)vocab) {
            perror(argv[4]);
            return 1;
        }
    }
    fclose(out);
    printf("%d\n", vocab);

    if (dump.index) fclose(dump.index);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
