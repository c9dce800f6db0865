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
 * The xxh3 itself is the xxhash package's: its extension module exports the C function
 * `XXH3_64bits_withSeed`, found here with dlopen(RTLD_NOLOAD)/dlsym on the already-imported
 * module, and checked against `xxhash.xxh3_64_intdigest` before use. When any of that fails,
 * importing this module fails and the Python loop runs instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef uint64_t (*xxh3_seeded_fn)(const void *input, size_t length, uint64_t seed);

static xxh3_seeded_fn xxh3_seeded = NULL;

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

/* The int `high * 2^64 + low`, high > 0. */
static PyObject *u128_to_int(uint64_t high, uint64_t low) {
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* NOTE: CPython 3.11's int layout (30-bit digits, the digit count in ob_size), filled
       directly: `_PyLong_FromByteArray` reads the 16 bytes one at a time, 3x the work */
    const uint32_t mask = (UINT32_C(1) << 30) - 1;
    uint32_t digits[5] = {
        (uint32_t)low & mask,
        (uint32_t)(low >> 30) & mask,
        (uint32_t)((low >> 60) | (high << 4)) & mask,
        (uint32_t)(high >> 26) & mask,
        (uint32_t)(high >> 56),
    };
    Py_ssize_t size = 5;
    while (size > 1 && digits[size - 1] == 0) {
        size--;
    }
    PyLongObject *value = _PyLong_New(size);
    if (value == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        value->ob_digit[i] = (digit)digits[i];
    }
    return (PyObject *)value;
#else
    unsigned char bytes[16];
    store_u64_le(bytes, low);
    store_u64_le(bytes + 8, high);
    return _PyLong_FromByteArray(bytes, sizeof bytes, 1, 0);
#endif
}

/* position << 118 | parent_frag << 59 | frag, as a Python int (both fragments < 2^59). */
static PyObject *mode0_plh(uint64_t position, uint64_t parent_frag, uint64_t frag) {
    uint64_t low = frag | (parent_frag << FRAG_BITS);
    uint64_t high = (parent_frag >> (64 - FRAG_BITS)) | (position << (POSITION_SHIFT - 64));
    if (high == 0) {
        return PyLong_FromUnsignedLongLong(low);
    }
    return u128_to_int(high, low);
}

/* the parent argument: 0 and *has_parent = 0 for None, else a u64 */
static int parse_parent(PyObject *arg, uint64_t *parent, int *has_parent) {
    *has_parent = arg != Py_None;
    *parent = 0;
    if (*has_parent) {
        *parent = PyLong_AsUnsignedLongLong(arg);
        if (*parent == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
    }
    return 0;
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
    uint64_t local = xxh3_seeded(view.buf, (size_t)view.len, XXH3_SEED);
    PyBuffer_Release(&view);
    uint64_t seq = has_parent ? chain_hash(prev, local) : local;
    PyObject *local_obj = PyLong_FromUnsignedLongLong(local);
    PyObject *seq_obj = PyLong_FromUnsignedLongLong(seq);
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
        PyObject *local_obj = PyLong_FromUnsignedLongLong(local);
        if (local_obj == NULL) {
            goto done;
        }
        PyList_SET_ITEM(locals, i, local_obj);
        PyObject *seq_obj = seq == local ? Py_NewRef(local_obj) : PyLong_FromUnsignedLongLong(seq);
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef blockhash_module = {
    PyModuleDef_HEAD_INIT, "shmkv._blockhash",
    "The per-block hashing loop of shmkv.hashing in C (see _blockhash.c).", -1,
    blockhash_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blockhash(void) {
    if (load_xxh3() < 0) {
        return NULL;
    }
    return PyModule_Create(&blockhash_module);
}
