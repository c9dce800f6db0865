/*
 * shmkv._blockhash: the per-block loop of `shmkv.hashing._hash_mode0` in C.
 *
 * Layer 0 accelerator of the pure core, built by scripts/build_core.py beside the mypyc
 * modules and used only while the compiled core is current (shmkv/_native.py). It computes,
 * for consecutive blocks of token bytes, exactly what the Python loop computes:
 *
 *   local hash    = xxh3-64(seed 1337) of the block's bytes
 *   sequence hash = the local hash for a first block without parent, else
 *                   xxh3-64(seed 1337) of `parent (u64 LE) || local (u64 LE)`
 *   PLH (mode 0)  = position << 118 | (parent & M) << 59 | (sequence hash & M), M = 2^59 - 1
 *
 * Beside it, a few C helpers of the pure core's hot paths, each bit for bit its Python
 * counterpart (which runs under SHMKV_PURE=1; tests/unit/test_blockhash.py pins them):
 *
 *   hash_one_at     `hash_one` of a block of a token array, in place (a decode step's block)
 *   mode0_frags     the 59-bit fragments of a list of sequence hashes (a bulk store's)
 *   crossing_words  one bulk decode step's random draw (one `getrandbits`), cut into tokens
 *                   and partial ids
 *   extend_strided  `dest.extend(src[start::step])` of two token arrays
 *   pop_all         `d.pop(key)` of a list of keys (a Deref's names, a bulk store's victims)
 *   get_all         `d[key]` of a list of keys (a Deref's names when most outlive it)
 *
 * The xxh3 itself is the xxhash package's: its extension module exports the C function
 * `XXH3_64bits_withSeed`, found here with dlopen(RTLD_NOLOAD)/dlsym on the already-imported
 * module, and checked against `xxhash.xxh3_64_intdigest` before use. When any of that fails,
 * importing this module fails and the Python loop runs instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "_pyint.h"

typedef uint64_t (*xxh3_seeded_fn)(const void *input, size_t length, uint64_t seed);

static xxh3_seeded_fn xxh3_seeded = NULL;

/* the interned name "getrandbits" (created at import) */
static PyObject *getrandbits_name = NULL;

#define XXH3_SEED 1337u
#define FRAG_BITS 59
#define FRAG_MASK ((UINT64_C(1) << FRAG_BITS) - 1)
#define POSITION_SHIFT (2 * FRAG_BITS) /* 118 */
#define MODE0_END 255                  /* positions 0..254 */

static void store_u64_le(unsigned char *out, uint64_t value) {
#if PY_LITTLE_ENDIAN
    memcpy(out, &value, sizeof value);
#else
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
#endif
}

static uint64_t chain_hash(uint64_t parent, uint64_t local) {
    unsigned char pair[16];
    store_u64_le(pair, parent);
    store_u64_le(pair + 8, local);
    return xxh3_seeded(pair, sizeof pair, XXH3_SEED);
}

/* position << 118 | parent_frag << 59 | frag, as a Python int (both fragments < 2^59). */
static PyObject *mode0_plh(uint64_t position, uint64_t parent_frag, uint64_t frag) {
    uint64_t low = frag | (parent_frag << FRAG_BITS);
    uint64_t high = (parent_frag >> (64 - FRAG_BITS)) | (position << (POSITION_SHIFT - 64));
    return u128_to_int(high, low);
}

/* The int `arg` as a u64: (uint64_t)-1 with an error set when it is no int or out of range. */
static uint64_t as_u64(PyObject *arg) {
#if ULONG_MAX == UINT64_MAX
    /* NOTE: CPython 3.11's PyLong_AsUnsignedLongLong goes through `_PyLong_AsByteArray`, a
       byte at a time (about 200 instructions); PyLong_AsUnsignedLong reads the digits */
    if (!PyLong_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "an integer is required");
        return (uint64_t)-1;
    }
    uint64_t value = (uint64_t)PyLong_AsUnsignedLong(arg);
    if (value == (uint64_t)-1 && PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_OverflowError) &&
        Py_SIZE(arg) > 0) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert"); /* as the long long's */
    }
    return value;
#else
    return (uint64_t)PyLong_AsUnsignedLongLong(arg);
#endif
}

/* the parent argument: 0 and *has_parent = 0 for None, else a u64 */
static int parse_parent(PyObject *arg, uint64_t *parent, int *has_parent) {
    *has_parent = arg != Py_None;
    *parent = 0;
    if (*has_parent) {
        *parent = as_u64(arg);
        if (*parent == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
    }
    return 0;
}

/* (local hash, sequence hash, PLH) of the one block of `length` bytes at `data`, at
   `position` (< 255) after `prev` (when `has_parent`): a new tuple, or NULL with an error */
static PyObject *one_block(const void *data, Py_ssize_t length, uint64_t prev, int has_parent,
                           Py_ssize_t position) {
    uint64_t local = xxh3_seeded(data, (size_t)length, XXH3_SEED);
    uint64_t seq = has_parent ? chain_hash(prev, local) : local;
    PyObject *local_obj = u64_to_int(local);
    PyObject *seq_obj = u64_to_int(seq);
    PyObject *plh_obj = mode0_plh((uint64_t)position, prev & FRAG_MASK, seq & FRAG_MASK);
    PyObject *result = NULL;
    if (local_obj != NULL && seq_obj != NULL && plh_obj != NULL) {
        result = PyTuple_Pack(3, local_obj, seq_obj, plh_obj);
    }
    Py_XDECREF(local_obj);
    Py_XDECREF(seq_obj);
    Py_XDECREF(plh_obj);
    return result;
}

/* hash_one(data, parent, position) -> (local, seq, plh) of the one block `data` */
static PyObject *hash_one(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "hash_one takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    uint64_t prev;
    int has_parent;
    if (parse_parent(args[1], &prev, &has_parent) < 0) {
        return NULL;
    }
    Py_ssize_t position = PyLong_AsSsize_t(args[2]);
    if (position == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (position < 0 || position >= MODE0_END) {
        PyErr_SetString(PyExc_ValueError, "hash_one: needs 0 <= position < 255");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result = one_block(view.buf, view.len, prev, has_parent, position);
    PyBuffer_Release(&view);
    return result;
}

/* hash_mode0(data, step, count, parent, position) -> (locals, seqs, plhs) */
static PyObject *hash_mode0(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "hash_mode0 takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t step = PyLong_AsSsize_t(args[1]);
    if (step == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t position = PyLong_AsSsize_t(args[4]);
    if (position == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t prev;
    int has_parent;
    if (parse_parent(args[3], &prev, &has_parent) < 0) {
        return NULL;
    }
    if (step <= 0 || count < 0 || position < 0 || position > MODE0_END - count) {
        PyErr_SetString(PyExc_ValueError,
                        "hash_mode0: needs step > 0, count >= 0 and 0 <= position, "
                        "position + count <= 255");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *locals = NULL, *seqs = NULL, *plhs = NULL, *result = NULL;
    if (count > view.len / step) {
        PyErr_Format(PyExc_ValueError, "hash_mode0: %zd bytes hold fewer than %zd blocks of %zd",
                     view.len, count, step);
        goto done;
    }
    locals = PyList_New(count);
    seqs = PyList_New(count);
    plhs = PyList_New(count);
    if (locals == NULL || seqs == NULL || plhs == NULL) {
        goto done;
    }
    const unsigned char *data = (const unsigned char *)view.buf;
    uint64_t parent_frag = has_parent ? (prev & FRAG_MASK) : 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t local = xxh3_seeded(data + i * step, (size_t)step, XXH3_SEED);
        uint64_t seq = (i == 0 && !has_parent) ? local : chain_hash(prev, local);
        uint64_t frag = seq & FRAG_MASK;
        PyObject *local_obj = u64_to_int(local);
        if (local_obj == NULL) {
            goto done;
        }
        PyList_SET_ITEM(locals, i, local_obj);
        PyObject *seq_obj = seq == local ? Py_NewRef(local_obj) : u64_to_int(seq);
        if (seq_obj == NULL) {
            goto done;
        }
        PyList_SET_ITEM(seqs, i, seq_obj);
        PyObject *plh_obj = mode0_plh((uint64_t)(position + i), parent_frag, frag);
        if (plh_obj == NULL) {
            goto done;
        }
        PyList_SET_ITEM(plhs, i, plh_obj);
        prev = seq;
        parent_frag = frag;
    }
    result = PyTuple_Pack(3, locals, seqs, plhs);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(locals);
    Py_XDECREF(seqs);
    Py_XDECREF(plhs);
    return result;
}

/* hash_one_at(data, start, length, parent, position): hash_one of the `length` bytes of the
   buffer `data` from byte `start` (a block of a token array, without slicing it) */
static PyObject *hash_one_at(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "hash_one_at takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t prev;
    int has_parent;
    if (parse_parent(args[3], &prev, &has_parent) < 0) {
        return NULL;
    }
    Py_ssize_t position = PyLong_AsSsize_t(args[4]);
    if (position == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (position < 0 || position >= MODE0_END || start < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "hash_one_at: needs 0 <= position < 255, start >= 0 and length >= 0");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (length > view.len - start) {
        PyErr_Format(PyExc_ValueError, "hash_one_at: bytes %zd..%zd lie beyond the %zd bytes",
                     start, start + length, view.len);
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *result =
        one_block((const unsigned char *)view.buf + start, length, prev, has_parent, position);
    PyBuffer_Release(&view);
    return result;
}

/* The mode-0 fragment `value & (2^59 - 1)` of the int `value` in 0..2^64-1, a new int. */
static PyObject *fragment_of(PyObject *value) {
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* NOTE: CPython 3.11's int layout (see _pyint.h): the fragment is the low 30 bits of
       the first digit and 29 of the second, copied into a new int of at most two digits */
    Py_ssize_t size = Py_SIZE(value);
    const digit *digits = ((PyLongObject *)value)->ob_digit;
    if (size < 0) {
        PyErr_SetString(PyExc_OverflowError, "can't convert negative int to unsigned");
        return NULL;
    }
    if (size > 3 || (size == 3 && digits[2] >> 4)) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return NULL;
    }
    digit low = size > 0 ? digits[0] : 0;
    digit high = size > 1 ? digits[1] & ((1u << (FRAG_BITS - PyLong_SHIFT)) - 1) : 0;
    if (high == 0) {
        return PyLong_FromLong((long)low); /* small ints come from CPython's cache */
    }
    PyLongObject *frag = _PyLong_New(2);
    if (frag == NULL) {
        return NULL;
    }
    frag->ob_digit[0] = low;
    frag->ob_digit[1] = high;
    return (PyObject *)frag;
#else
    uint64_t bits = as_u64(value);
    if (bits == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(bits & FRAG_MASK);
#endif
}

/* mode0_frags(hashes) -> [h & (2^59 - 1) for h in hashes], each h an int in 0..2^64-1 */
static PyObject *mode0_frags(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "mode0_frags: needs a list of ints");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(arg);
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(arg, i);
        if (!PyLong_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "mode0_frags: needs a list of ints");
            Py_DECREF(out);
            return NULL;
        }
        PyObject *frag = fragment_of(item);
        if (frag == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, frag);
    }
    return out;
}


/* the default of `_PyDict_Pop` that no dict value can be (created at import) */
static PyObject *pop_sentinel = NULL;

/* `dict.pop(key)`: a new reference; NULL and *missing = 1 without an error when `key` is
   not there; NULL with an error on failure */
static PyObject *dict_pop(PyObject *dict, PyObject *key, int *missing) {
    *missing = 0;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *value = NULL;
    int found = PyDict_Pop(dict, key, &value);
    *missing = found == 0;
    return found > 0 ? value : NULL;
#else
    /* NOTE: a default (a private sentinel) rather than KeyError: no exception to clear */
    PyObject *value = _PyDict_Pop(dict, key, pop_sentinel);
    if (value == pop_sentinel) {
        Py_DECREF(value);
        *missing = 1;
        return NULL;
    }
    return value;
#endif
}

/* The arguments of pop_all and get_all: exactly a dict and a list; -1 (TypeError) if not. */
static int check_dict_and_list(const char *name, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    if (!PyDict_CheckExact(args[0]) || !PyList_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s: needs a dict and a list", name);
        return -1;
    }
    return 0;
}

/* pop_all(d, keys) -> the values `d.pop(key)` of the int keys of `keys`, in
   order, None in the slots of the other keys; or None when an int key is missing (a repeat
   included), after putting back what was popped (`d` then holds the same items, maybe in
   another order). */
static PyObject *pop_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (check_dict_and_list("pop_all", args, nargs) < 0) {
        return NULL;
    }
    PyObject *dict = args[0];
    PyObject *keys = args[1];
    Py_ssize_t count = PyList_GET_SIZE(keys);
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        int missing = 0;
        PyObject *value = PyLong_Check(key) ? dict_pop(dict, key, &missing)
                                                 : Py_NewRef(Py_None);
        if (value != NULL) {
            PyList_SET_ITEM(out, i, value);
            continue;
        }
        /* put back the popped items, last first */
        PyObject *type, *error, *trace;
        PyErr_Fetch(&type, &error, &trace);
        int failed = 0;
        for (Py_ssize_t j = i - 1; j >= 0 && !failed; j--) {
            PyObject *back_key = PyList_GET_ITEM(keys, j);
            if (PyLong_Check(back_key)) {
                failed = PyDict_SetItem(dict, back_key, PyList_GET_ITEM(out, j)) < 0;
            }
        }
        Py_DECREF(out);
        if (failed) {
            Py_XDECREF(type);
            Py_XDECREF(error);
            Py_XDECREF(trace);
            return NULL;
        }
        if (!missing) {
            PyErr_Restore(type, error, trace);
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return out;
}

/* get_all(d, keys) -> the values `d[key]` of the int keys of `keys`, in order, None in the
   slots of the other keys; or None when an int key is missing. `d` is left as it is. */
static PyObject *get_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (check_dict_and_list("get_all", args, nargs) < 0) {
        return NULL;
    }
    PyObject *dict = args[0];
    PyObject *keys = args[1];
    Py_ssize_t count = PyList_GET_SIZE(keys);
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyLong_Check(key)) {
            PyList_SET_ITEM(out, i, Py_NewRef(Py_None));
            continue;
        }
        PyObject *value = PyDict_GetItemWithError(dict, key); /* borrowed */
        if (value == NULL) {
            Py_DECREF(out);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(out, i, Py_NewRef(value));
    }
    return out;
}

/* The `num_words` 32-bit words of the int `value` (0 <= value < 2^(32 num_words)), least
   significant first, into `words`: what `value.to_bytes(4 num_words, "little")` holds. */
static int int_to_words(PyObject *value, uint32_t *words, Py_ssize_t num_words) {
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "getrandbits returned no int");
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* NOTE: CPython 3.11's int layout (30-bit digits, the digit count in ob_size), read
       directly: `int.to_bytes` (`_PyLong_AsByteArray`) goes a byte at a time */
    Py_ssize_t size = Py_SIZE(value);
    if (size < 0) {
        PyErr_SetString(PyExc_OverflowError, "getrandbits returned a negative int");
        return -1;
    }
    const digit *digits = ((PyLongObject *)value)->ob_digit;
    uint64_t acc = 0;
    int acc_bits = 0;
    Py_ssize_t filled = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        acc |= (uint64_t)digits[i] << acc_bits;
        acc_bits += PyLong_SHIFT;
        if (acc_bits >= 32) {
            if (filled == num_words) {
                goto too_big;
            }
            words[filled++] = (uint32_t)acc;
            acc >>= 32;
            acc_bits -= 32;
        }
    }
    if (acc) {
        if (filled == num_words) {
            goto too_big;
        }
        words[filled++] = (uint32_t)acc;
    }
    memset(words + filled, 0, (size_t)(num_words - filled) * sizeof *words);
#if !PY_LITTLE_ENDIAN
    for (Py_ssize_t i = 0; i < num_words; i++) { /* the words' bytes little-endian in memory */
        uint32_t w = words[i];
        unsigned char *out = (unsigned char *)(words + i);
        for (int b = 0; b < 4; b++) {
            out[b] = (unsigned char)(w >> (8 * b));
        }
    }
#endif
    return 0;
too_big:
    PyErr_SetString(PyExc_OverflowError, "getrandbits returned too many bits");
    return -1;
#else
    PyObject *raw = PyObject_CallMethod(value, "to_bytes", "ns", (Py_ssize_t)(4 * num_words),
                                        "little");
    if (raw == NULL) {
        return -1;
    }
    memcpy(words, PyBytes_AS_STRING(raw), (size_t)(4 * num_words));
    Py_DECREF(raw);
    return 0;
#endif
}

/* The next `num_words` words of `rng` into `words`: one `rng.getrandbits(32 num_words)`. */
static int draw_words(PyObject *rng, uint32_t *words, Py_ssize_t num_words) {
    PyObject *num_bits = PyLong_FromSsize_t(32 * num_words);
    if (num_bits == NULL) {
        return -1;
    }
    PyObject *call_args[2] = {rng, num_bits};
    PyObject *bits = PyObject_VectorcallMethod(getrandbits_name, call_args, 2, NULL);
    Py_DECREF(num_bits);
    if (bits == NULL) {
        return -1;
    }
    int status = int_to_words(bits, words, num_words);
    Py_DECREF(bits);
    return status;
}

/* crossing_words(rng, num_tokens, positions, offset) -> (token bytes, partial ids): one bulk
   decode step's draw (`shmkv.sequence.extend_crossing_words`): the next 4 num_tokens + 16
   len(positions) bytes of `rng` (one `getrandbits`, read little-endian), cut into the token
   words (returned as bytes) and, right after the token word `offset + positions[j]` of each
   crossing j, the four words of its 128-bit partial id. */
static PyObject *crossing_words(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "crossing_words takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *rng = args[0];
    Py_ssize_t num_tokens = PyLong_AsSsize_t(args[1]);
    if (num_tokens == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *positions = args[2];
    if (!PyList_Check(positions)) {
        PyErr_SetString(PyExc_TypeError, "crossing_words: positions must be a list of ints");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[3]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t num_ids = PyList_GET_SIZE(positions);
    if (num_tokens < 0 || offset < 0 || num_tokens > (PY_SSIZE_T_MAX / 32) - 4 * num_ids) {
        PyErr_SetString(PyExc_ValueError,
                        "crossing_words: needs num_tokens >= 0 and offset >= 0");
        return NULL;
    }
    /* the word index of each id, checked before drawing anything */
    Py_ssize_t *id_at = PyMem_Malloc((size_t)(num_ids ? num_ids : 1) * sizeof *id_at);
    if (id_at == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t previous = 0;
    for (Py_ssize_t j = 0; j < num_ids; j++) {
        Py_ssize_t position = PyLong_AsSsize_t(PyList_GET_ITEM(positions, j));
        if (position == -1 && PyErr_Occurred()) {
            PyMem_Free(id_at);
            return NULL;
        }
        if (position < previous || position >= num_tokens - offset) {
            PyMem_Free(id_at);
            PyErr_SetString(PyExc_ValueError,
                            "crossing_words: positions must ascend, with 0 <= offset + "
                            "position < num_tokens");
            return NULL;
        }
        previous = position;
        id_at[j] = offset + position + 1 + 4 * j;
    }
    Py_ssize_t num_words = num_tokens + 4 * num_ids;
    PyObject *result = NULL, *tokens = NULL, *ids = NULL;
    uint32_t *words = PyMem_Malloc((size_t)(num_words ? num_words : 1) * sizeof *words);
    if (words == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (draw_words(rng, words, num_words) < 0) {
        goto done;
    }
    tokens = PyBytes_FromStringAndSize(NULL, 4 * num_tokens);
    ids = PyList_New(num_ids);
    if (tokens == NULL || ids == NULL) {
        goto done;
    }
    char *out = PyBytes_AS_STRING(tokens);
    Py_ssize_t start = 0;
    for (Py_ssize_t j = 0; j < num_ids; j++) {
        Py_ssize_t end = id_at[j];
        memcpy(out, words + start, (size_t)(end - start) * sizeof *words);
        out += (end - start) * (Py_ssize_t)sizeof *words;
        const unsigned char *id = (const unsigned char *)(words + end);
        uint64_t low = 0, high = 0;
        for (int b = 7; b >= 0; b--) {
            low = (low << 8) | id[b];
            high = (high << 8) | id[8 + b];
        }
        PyObject *id_obj = u128_to_int(high, low);
        if (id_obj == NULL) {
            goto done;
        }
        PyList_SET_ITEM(ids, j, id_obj);
        start = end + 4;
    }
    memcpy(out, words + start, (size_t)(num_words - start) * sizeof *words);
    result = PyTuple_Pack(2, tokens, ids);
done:
    PyMem_Free(id_at);
    PyMem_Free(words);
    Py_XDECREF(tokens);
    Py_XDECREF(ids);
    return result;
}

/* the interned name "frombytes" (created at import) */
static PyObject *frombytes_name = NULL;

/* Whether the buffer `view` (taken with PyBUF_FORMAT) holds 32-bit unsigned words. */
static int is_u32_words(const Py_buffer *view) {
    return view->itemsize == 4 && view->format != NULL &&
           (strcmp(view->format, "I") == 0 || strcmp(view->format, "=I") == 0 ||
            strcmp(view->format, "<I") == 0) &&
           view->len % 4 == 0;
}

/* extend_strided(dest, src, start, step): `dest.extend(src[start::step])` for two arrays of
   32-bit words ('I'), without the strided slice (one `frombytes`) */
static PyObject *extend_strided(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "extend_strided takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t step = PyLong_AsSsize_t(args[3]);
    if (step == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || step <= 0) {
        PyErr_SetString(PyExc_ValueError, "extend_strided: needs start >= 0 and step > 0");
        return NULL;
    }
    if (Py_TYPE(args[0]) != Py_TYPE(args[1])) {
        PyErr_SetString(PyExc_TypeError, "extend_strided: needs two arrays of 32-bit words");
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_FORMAT) < 0) {
        return NULL;
    }
    Py_buffer dest;
    if (PyObject_GetBuffer(args[0], &dest, PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int words = is_u32_words(&src) && is_u32_words(&dest);
    PyBuffer_Release(&dest); /* NOTE: released before `frombytes` resizes it */
    if (!words) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_TypeError, "extend_strided: needs two arrays of 32-bit words");
        return NULL;
    }
    Py_ssize_t num_src = src.len / 4;
    Py_ssize_t count = start < num_src ? (num_src - start + step - 1) / step : 0;
    PyObject *data = PyBytes_FromStringAndSize(NULL, 4 * count);
    if (data == NULL) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const uint32_t *from = (const uint32_t *)src.buf + start;
    char *to = PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < count; i++) {
        memcpy(to + 4 * i, from + i * step, 4);
    }
    PyBuffer_Release(&src);
    PyObject *call_args[2] = {args[0], data};
    PyObject *result = PyObject_VectorcallMethod(frombytes_name, call_args, 2, NULL);
    Py_DECREF(data);
    return result;
}

/* Find XXH3_64bits_withSeed in the xxhash package's extension module and check it. */
static int load_xxh3(void) {
    PyObject *ext = PyImport_ImportModule("xxhash._xxhash");
    if (ext == NULL) {
        return -1;
    }
    PyObject *path = PyObject_GetAttrString(ext, "__file__");
    Py_DECREF(ext);
    if (path == NULL) {
        return -1;
    }
    const char *path_str = PyUnicode_AsUTF8(path);
    if (path_str == NULL) {
        Py_DECREF(path);
        return -1;
    }
    /* NOTE: RTLD_NOLOAD: a handle on the copy Python already loaded; the handle is kept (the
       module stays loaded for the life of the process anyway) */
    void *handle = dlopen(path_str, RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(path);
    if (handle == NULL) {
        PyErr_SetString(PyExc_ImportError, "xxhash's extension module is not loaded");
        return -1;
    }
    xxh3_seeded = (xxh3_seeded_fn)dlsym(handle, "XXH3_64bits_withSeed");
    if (xxh3_seeded == NULL) {
        PyErr_SetString(PyExc_ImportError, "xxhash exports no XXH3_64bits_withSeed");
        return -1;
    }
    /* the pointer must compute what the package's Python function computes */
    PyObject *xxhash = PyImport_ImportModule("xxhash");
    if (xxhash == NULL) {
        return -1;
    }
    PyObject *check = PyObject_CallMethod(xxhash, "xxh3_64_intdigest", "y#I", "shmkv block", 11,
                                          (unsigned int)XXH3_SEED);
    Py_DECREF(xxhash);
    if (check == NULL) {
        return -1;
    }
    uint64_t expected = PyLong_AsUnsignedLongLong(check);
    Py_DECREF(check);
    if (expected == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (xxh3_seeded("shmkv block", 11, XXH3_SEED) != expected) {
        xxh3_seeded = NULL;
        PyErr_SetString(PyExc_ImportError, "xxhash's XXH3_64bits_withSeed disagrees with it");
        return -1;
    }
    return 0;
}

static PyMethodDef blockhash_methods[] = {
    {"hash_mode0", (PyCFunction)(void (*)(void))hash_mode0, METH_FASTCALL,
     "hash_mode0(data, step, count, parent, position) -> (local hashes, sequence hashes, "
     "PLHs) of `count` blocks of `step` bytes at positions position.. < 255"},
    {"hash_one", (PyCFunction)(void (*)(void))hash_one, METH_FASTCALL,
     "hash_one(data, parent, position) -> (local hash, sequence hash, PLH) of the one block "
     "`data` at position < 255"},
    {"hash_one_at", (PyCFunction)(void (*)(void))hash_one_at, METH_FASTCALL,
     "hash_one_at(data, start, length, parent, position) -> hash_one of the `length` bytes of "
     "the buffer `data` from byte `start`"},
    {"mode0_frags", (PyCFunction)mode0_frags, METH_O,
     "mode0_frags(hashes) -> [h & (2**59 - 1) for h in hashes] (u64 ints)"},
    {"pop_all", (PyCFunction)(void (*)(void))pop_all, METH_FASTCALL,
     "pop_all(d, keys) -> d.pop(key) of each int key, None for the other keys; None (and d "
     "unchanged but for order) when an int key is missing"},
    {"get_all", (PyCFunction)(void (*)(void))get_all, METH_FASTCALL,
     "get_all(d, keys) -> d[key] of each int key, None for the other keys; None when an int "
     "key is missing (d unchanged)"},
    {"crossing_words", (PyCFunction)(void (*)(void))crossing_words, METH_FASTCALL,
     "crossing_words(rng, num_tokens, positions, offset) -> (token bytes, partial ids) of one "
     "bulk decode step's draw (see shmkv.sequence.extend_crossing_words)"},
    {"extend_strided", (PyCFunction)(void (*)(void))extend_strided, METH_FASTCALL,
     "extend_strided(dest, src, start, step) -> None: dest.extend(src[start::step]) for two "
     "arrays of 32-bit words"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef blockhash_module = {
    PyModuleDef_HEAD_INIT, "shmkv._blockhash",
    "The per-block hashing loop of shmkv.hashing and other core helpers in C (see "
    "_blockhash.c).", -1,
    blockhash_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blockhash(void) {
    if (load_xxh3() < 0) {
        return NULL;
    }
    if (frombytes_name == NULL) {
        frombytes_name = PyUnicode_InternFromString("frombytes");
        if (frombytes_name == NULL) {
            return NULL;
        }
    }
    if (getrandbits_name == NULL) {
        getrandbits_name = PyUnicode_InternFromString("getrandbits");
        if (getrandbits_name == NULL) {
            return NULL;
        }
    }
    if (pop_sentinel == NULL) {
        pop_sentinel = PyList_New(0); /* kept for the life of the process */
        if (pop_sentinel == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&blockhash_module);
}
