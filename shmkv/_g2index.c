/*
 * shmkv._g2index: the G2 coordinator's single-writer index probing, in C.
 *
 * Layer 0 accelerator built by scripts/build_core.py beside the mypyc modules and used by
 * `shmkv.g2.G2Directory` only while the compiled core is current (shmkv/_native.py). Each
 * function is bit for bit its Python twin in shmkv/g2.py (`_index_insert_py`, ...), which runs
 * under SHMKV_PURE=1; tests/property/test_g2_index_probing.py pins them against each other.
 *
 * The index is the segment's shared table `index_slot[T]` (int32: a slot, -1 empty, -2
 * tombstone; open addressing, linear probing, home = hash mod T). Only the coordinator writes
 * it; these functions write its cells in place, in the order the per-key operations would
 * (readers validate whatever they find, see shmkv/g2.py):
 *
 *   index_insert(table, keys, slots, start, room) -> (done, filled)
 *       insert slots[k] under keys[k] for k = start, ...: at the first tombstone before the
 *       first empty cell of its probe path, else at that empty cell; stop after the insert
 *       that fills the room + 1-th empty cell, or at the end
 *   index_remove(table, keys, slots) -> (done, net tombstones, emptied)
 *       unindex slots[k] (under keys[k]) for every k: its cell becomes a tombstone, or empty
 *       together with the tombstones just before it when the next cell is empty; stops at the
 *       first slot not on its probe path (done < len: the caller raises)
 *   index_find(table, seq_hash, key) -> slot or -1
 *       the first cell of key's probe path (before an empty cell) whose slot holds key
 *   index_find_any(table, seq_hash, keys) -> k or -1
 *       the first k for which index_find(keys[k]) finds a slot
 *   plhs_mode0(seq_hashes, parent_hashes, positions) -> list of ints
 *       `shmkv.g2.plhs_of_columns` of positions 0..254: position << 118 | (parent & M) << 59
 *       | (seq & M), M = 2^59 - 1 (its twin: `_plhs_of_columns_py`); the hash columns may be
 *       strided
 * Buffers (numpy arrays or memoryviews, C-contiguous): table int32 (writable), keys and
 * seq_hash u64, slots int64. Only the public buffer protocol is used, plus CPython 3.11's int
 * layout to build 128-bit PLHs (as _blockhash.c does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_pyint.h"

#define INDEX_EMPTY (-1)
#define INDEX_TOMBSTONE (-2)

/* Acquire `obj` as a C-contiguous buffer of `itemsize`-byte items whose format is one of
   `formats` (NUL-terminated list of single struct codes; "=", "<", "@" prefixes allowed). */
static int get_items(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *formats,
                     int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    const char *fmt = view->format == NULL ? "B" : view->format;
    if (*fmt == '=' || *fmt == '<' || *fmt == '@') {
        fmt++;
    }
    if (view->itemsize != itemsize || fmt[0] == '\0' || fmt[1] != '\0' ||
        strchr(formats, fmt[0]) == NULL || view->ndim > 1) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous array of %zd-byte items (%s)",
                     what, itemsize, formats);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define TABLE_FORMATS "i"
#define U64_FORMATS "QL"
#define I64_FORMATS "ql"

/* One buffer argument of a function: item size, struct codes, writable, name (see get_items). */
typedef struct {
    Py_ssize_t itemsize;
    const char *formats;
    int writable;
    const char *what;
} item_spec;

static void release_all(Py_buffer *views, int count) {
    while (count-- > 0) {
        PyBuffer_Release(&views[count]);
    }
}

/* Acquire args[i] as views[i] per specs[i] for i < count; on failure, release those acquired. */
static int get_all(PyObject *const *args, Py_buffer *views, const item_spec *specs, int count) {
    for (int i = 0; i < count; i++) {
        const item_spec *spec = &specs[i];
        if (get_items(args[i], &views[i], spec->itemsize, spec->formats, spec->writable,
                      spec->what) < 0) {
            release_all(views, i);
            return -1;
        }
    }
    return 0;
}

/* index_insert / index_remove: (table, keys, slots) */
static const item_spec UPDATE_ARGS[3] = {
    {4, TABLE_FORMATS, 1, "table"}, {8, U64_FORMATS, 0, "keys"}, {8, I64_FORMATS, 0, "slots"}};
/* Acquire the (table, keys, slots) of `name` (index_insert / index_remove) as v[0..3), keys
   and slots of one length; on failure nothing stays acquired. */
static int get_update_args(PyObject *const *args, Py_buffer *v, const char *name) {
    if (get_all(args, v, UPDATE_ARGS, 3) < 0) {
        return -1;
    }
    if (v[2].len / 8 != v[1].len / 8) {
        PyErr_Format(PyExc_ValueError, "%s: keys and slots differ in length", name);
        release_all(v, 3);
        return -1;
    }
    return 0;
}

/* index_find: (table, seq_hash); index_find_any: (table, seq_hash, keys) */
static const item_spec FIND_ARGS[3] = {
    {4, TABLE_FORMATS, 0, "table"}, {8, U64_FORMATS, 0, "seq_hash"}, {8, U64_FORMATS, 0, "keys"}};

static PyObject *index_insert(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "index_insert(table, keys, slots, start, room)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t room = PyLong_AsSsize_t(args[4]);
    if (room == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer v[3];
    if (get_update_args(args, v, "index_insert") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int32_t *cells = (int32_t *)v[0].buf;
    const uint64_t *keys = (const uint64_t *)v[1].buf;
    const int64_t *slots = (const int64_t *)v[2].buf;
    Py_ssize_t size = v[0].len / 4;
    Py_ssize_t count = v[1].len / 8;
    if (size <= 0 || start < 0 || start > count) {
        PyErr_SetString(PyExc_ValueError, "index_insert: empty table or start out of range");
        goto done;
    }
    Py_ssize_t k = start;
    Py_ssize_t filled = 0;
    while (k < count) {
        int64_t slot = slots[k];
        if (slot < 0 || slot > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "index_insert: slot %lld out of range",
                         (long long)slot);
            goto done;
        }
        Py_ssize_t pos = (Py_ssize_t)(keys[k] % (uint64_t)size);
        Py_ssize_t tombstone = -1;
        Py_ssize_t left = size;
        for (;;) {
            int32_t cell = cells[pos];
            if (cell == INDEX_EMPTY) {
                break;
            }
            if (cell == INDEX_TOMBSTONE && tombstone < 0) {
                tombstone = pos;
            }
            if (++pos == size) {
                pos = 0;
            }
            if (--left == 0) {
                PyErr_SetString(PyExc_ValueError, "index_insert: the table has no empty cell");
                goto done;
            }
        }
        if (tombstone >= 0) {
            pos = tombstone;
        } else {
            filled++;
        }
        cells[pos] = (int32_t)slot;
        k++;
        if (filled > room) {
            break;
        }
    }
    result = Py_BuildValue("nn", k - start, filled);
done:
    release_all(v, 3);
    return result;
}

static PyObject *index_remove(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "index_remove(table, keys, slots)");
        return NULL;
    }
    Py_buffer v[3];
    if (get_update_args(args, v, "index_remove") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int32_t *cells = (int32_t *)v[0].buf;
    const uint64_t *keys = (const uint64_t *)v[1].buf;
    const int64_t *slots = (const int64_t *)v[2].buf;
    Py_ssize_t size = v[0].len / 4;
    Py_ssize_t count = v[1].len / 8;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "index_remove: empty table");
        goto done;
    }
    Py_ssize_t net_tombstones = 0;
    Py_ssize_t emptied = 0;
    Py_ssize_t k = 0;
    for (; k < count; k++) {
        int64_t slot = slots[k];
        if (slot < 0) {
            break;
        }
        Py_ssize_t pos = (Py_ssize_t)(keys[k] % (uint64_t)size);
        Py_ssize_t left = size;
        int found = 0;
        while (left--) {
            int32_t cell = cells[pos];
            if (cell == slot) {
                found = 1;
                break;
            }
            if (cell == INDEX_EMPTY) {
                break;
            }
            if (++pos == size) {
                pos = 0;
            }
        }
        if (!found) {
            break;
        }
        Py_ssize_t next = pos + 1 < size ? pos + 1 : 0;
        if (cells[next] != INDEX_EMPTY) {
            cells[pos] = INDEX_TOMBSTONE;
            net_tombstones++;
            continue;
        }
        cells[pos] = INDEX_EMPTY;
        emptied++;
        pos = pos ? pos - 1 : size - 1;
        while (cells[pos] == INDEX_TOMBSTONE) {
            cells[pos] = INDEX_EMPTY;
            emptied++;
            net_tombstones--;
            pos = pos ? pos - 1 : size - 1;
        }
    }
    result = Py_BuildValue("nnn", k, net_tombstones, emptied);
done:
    release_all(v, 3);
    return result;
}

/* The slot indexed under `key` (probing from its home), or -1. */
static int64_t find(const int32_t *cells, Py_ssize_t size, const uint64_t *seq_hash,
                    Py_ssize_t capacity, uint64_t key) {
    Py_ssize_t pos = (Py_ssize_t)(key % (uint64_t)size);
    for (Py_ssize_t left = size; left; left--) {
        int32_t cell = cells[pos];
        if (cell == INDEX_EMPTY) {
            return -1;
        }
        if (cell >= 0 && cell < capacity && seq_hash[cell] == key) {
            return cell;
        }
        if (++pos == size) {
            pos = 0;
        }
    }
    return -1;
}

static PyObject *index_find(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "index_find(table, seq_hash, key)");
        return NULL;
    }
    unsigned long long key = PyLong_AsUnsignedLongLong(args[2]);
    if (key == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer v[2];
    if (get_all(args, v, FIND_ARGS, 2) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t size = v[0].len / 4;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "index_find: empty table");
    } else {
        result = PyLong_FromLongLong(
            find((const int32_t *)v[0].buf, size, (const uint64_t *)v[1].buf, v[1].len / 8,
                 key));
    }
    release_all(v, 2);
    return result;
}

static PyObject *index_find_any(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "index_find_any(table, seq_hash, keys)");
        return NULL;
    }
    Py_buffer v[3];
    if (get_all(args, v, FIND_ARGS, 3) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t size = v[0].len / 4;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "index_find_any: empty table");
    } else {
        const int32_t *cells = (const int32_t *)v[0].buf;
        const uint64_t *seq_hash = (const uint64_t *)v[1].buf;
        const uint64_t *keys = (const uint64_t *)v[2].buf;
        Py_ssize_t capacity = v[1].len / 8;
        Py_ssize_t count = v[2].len / 8;
        Py_ssize_t k = 0;
        while (k < count && find(cells, size, seq_hash, capacity, keys[k]) < 0) {
            k++;
        }
        result = PyLong_FromSsize_t(k < count ? k : -1);
    }
    release_all(v, 3);
    return result;
}

/* -- PLHs of the first mode ----------------------------------------------------------------- */

#define FRAG_BITS 59
#define FRAG_MASK ((UINT64_C(1) << FRAG_BITS) - 1)
#define POSITION_SHIFT (2 * FRAG_BITS) /* 118 */
#define MODE0_END 255                  /* positions 0..254 */

/* Acquire a 1-D (maybe strided) buffer of 8-byte items of one of `formats`. */
static int get_column(PyObject *obj, Py_buffer *view, const char *formats, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *fmt = view->format == NULL ? "B" : view->format;
    if (*fmt == '=' || *fmt == '<' || *fmt == '@') {
        fmt++;
    }
    if (view->itemsize != 8 || view->ndim != 1 || fmt[0] == '\0' || fmt[1] != '\0' ||
        strchr(formats, fmt[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 1-D array of 8-byte items (%s)", what,
                     formats);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define COLUMN_AT(view, i) \
    (*(const uint64_t *)((const char *)(view).buf + (i) * (view).strides[0]))

static PyObject *plhs_mode0(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plhs_mode0(seq_hashes, parent_hashes, positions)");
        return NULL;
    }
    Py_buffer sv, pv, qv;
    if (get_column(args[0], &sv, U64_FORMATS, "seq_hashes") < 0) {
        return NULL;
    }
    if (get_column(args[1], &pv, U64_FORMATS, "parent_hashes") < 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    if (get_column(args[2], &qv, I64_FORMATS, "positions") < 0) {
        PyBuffer_Release(&pv);
        PyBuffer_Release(&sv);
        return NULL;
    }
    PyObject *out = NULL;
    Py_ssize_t count = sv.shape[0];
    if (pv.shape[0] != count || qv.shape[0] != count) {
        PyErr_SetString(PyExc_ValueError, "plhs_mode0: columns of different lengths");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t position = (int64_t)COLUMN_AT(qv, i);
        if (position < 0 || position >= MODE0_END) {
            PyErr_Format(PyExc_ValueError, "plhs_mode0: position %lld outside 0..254",
                         (long long)position);
            goto done;
        }
    }
    out = PyList_New(count);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t frag = COLUMN_AT(sv, i) & FRAG_MASK;
        uint64_t parent_frag = COLUMN_AT(pv, i) & FRAG_MASK;
        uint64_t position = COLUMN_AT(qv, i);
        uint64_t low = frag | (parent_frag << FRAG_BITS);
        uint64_t high = (parent_frag >> (64 - FRAG_BITS)) | (position << (POSITION_SHIFT - 64));
        PyObject *plh = u128_to_int(high, low);
        if (plh == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, plh);
    }
done:
    PyBuffer_Release(&qv);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&sv);
    return out;
}

static PyMethodDef g2index_methods[] = {
    {"index_insert", (PyCFunction)(void (*)(void))index_insert, METH_FASTCALL,
     "index_insert(table, keys, slots, start, room) -> (done, filled)"},
    {"index_remove", (PyCFunction)(void (*)(void))index_remove, METH_FASTCALL,
     "index_remove(table, keys, slots) -> (done, net tombstones, emptied)"},
    {"index_find", (PyCFunction)(void (*)(void))index_find, METH_FASTCALL,
     "index_find(table, seq_hash, key) -> the slot indexed under key, or -1"},
    {"index_find_any", (PyCFunction)(void (*)(void))index_find_any, METH_FASTCALL,
     "index_find_any(table, seq_hash, keys) -> the first k whose key is indexed, or -1"},
    {"plhs_mode0", (PyCFunction)(void (*)(void))plhs_mode0, METH_FASTCALL,
     "plhs_mode0(seq_hashes, parent_hashes, positions) -> the PLHs (positions 0..254)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef g2index_module = {
    PyModuleDef_HEAD_INIT, "shmkv._g2index",
    "The G2 coordinator's index probing in C (see _g2index.c).", -1,
    g2index_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__g2index(void) { return PyModule_Create(&g2index_module); }
