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
 *   packed_screen(items, starts, ordered) -> (verdict, max_position)
 *       screening of packed OFFLOAD items (four u64 words each: seq, parent, local, meta;
 *       `shmkv.transport.pack_offload_items`) of messages starting at `starts` (a list: 0,
 *       then ascending, each below the item count), `ordered` their sequence hashes sorted:
 *       verdict -1 if an item is malformed (meta bits beyond position | PACKED_HAS_PARENT, or
 *       a parent without the flag), else -2 if a sequence hash repeats (adjacent in
 *       `ordered`), else 1 if every message is a chain stored parent first (each item after
 *       the first the child of the one before it, position + 1) and no message's first
 *       parent is among `ordered`, else 0; max_position the largest position (0 unless the
 *       verdict is >= 0). Its twin: `shmkv.g2._packed_screen_py`.
 *   check_reserved(state, owner, idx, owners, scratch) -> (problem, k)
 *       the checks of a commit's slots `idx`: problem 1 if idx[k] is outside the pool (the
 *       first such k), else 2 if slot idx[k] is not RESERVED by owners[k] (an int: every
 *       slot's), else 3 if a slot repeats (k: the first position whose slot occurred before;
 *       `scratch`, int64 of at least the pool's size, is overwritten), else (0, -1)
 *   publish_slots(fields, idx, seqs, parents, has_parent, locals, positions, tokens) -> None
 *       write the fields of slots `idx` (`fields`: the segment's seq_hash, parent_hash, flags,
 *       local_hash, position, tokens (flat) and state columns), the k-th from the k-th item
 *       of each column (tokens: n x block_size u32, or None for zeros), then (after a release
 *       fence) turn them READY; ValueError (nothing written) if a slot is outside the pool
 *       or the lengths differ
 *   release_slots(gen, owner, state, idx) -> None
 *       free evicted slots `idx` (distinct): gen + 1 and owner -1, then (after a release
 *       fence) state FREE; ValueError (nothing written) if a slot is outside the pool
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
/* The (table, keys, slots) of index_insert / index_remove, typed. */
typedef struct {
    int32_t *cells;
    const uint64_t *keys;
    const int64_t *slots;
    Py_ssize_t size;  /* cells */
    Py_ssize_t count; /* keys, and slots */
} update_args;

/* Acquire the (table, keys, slots) of `name` (index_insert / index_remove) as v[0..3) and
   their typed view `u`, keys and slots of one length; on failure nothing stays acquired. */
static int get_update_args(PyObject *const *args, Py_buffer *v, update_args *u,
                           const char *name) {
    if (get_all(args, v, UPDATE_ARGS, 3) < 0) {
        return -1;
    }
    if (v[2].len / 8 != v[1].len / 8) {
        PyErr_Format(PyExc_ValueError, "%s: keys and slots differ in length", name);
        release_all(v, 3);
        return -1;
    }
    u->cells = (int32_t *)v[0].buf;
    u->keys = (const uint64_t *)v[1].buf;
    u->slots = (const int64_t *)v[2].buf;
    u->size = v[0].len / 4;
    u->count = v[1].len / 8;
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
    update_args u;
    if (get_update_args(args, v, &u, "index_insert") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int32_t *cells = u.cells;
    const uint64_t *keys = u.keys;
    const int64_t *slots = u.slots;
    Py_ssize_t size = u.size;
    Py_ssize_t count = u.count;
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
    update_args u;
    if (get_update_args(args, v, &u, "index_remove") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    int32_t *cells = u.cells;
    const uint64_t *keys = u.keys;
    const int64_t *slots = u.slots;
    Py_ssize_t size = u.size;
    Py_ssize_t count = u.count;
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

/* Acquire a 1-D (maybe strided) buffer of `itemsize`-byte items of one of `formats`. */
static int get_column_of(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *formats,
                         const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) {
        return -1;
    }
    const char *fmt = view->format == NULL ? "B" : view->format;
    if (*fmt == '=' || *fmt == '<' || *fmt == '@') {
        fmt++;
    }
    if (view->itemsize != itemsize || view->ndim != 1 || fmt[0] == '\0' || fmt[1] != '\0' ||
        strchr(formats, fmt[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 1-D array of %zd-byte items (%s)", what,
                     itemsize, formats);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Acquire a 1-D (maybe strided) buffer of 8-byte items of one of `formats`. */
static int get_column(PyObject *obj, Py_buffer *view, const char *formats, const char *what) {
    return get_column_of(obj, view, 8, formats, what);
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

/* -- screening of packed OFFLOAD items ------------------------------------------------------ */

#define PACKED_HAS_PARENT (UINT64_C(1) << 32)
#define MAX_POSITION ((UINT64_C(1) << 24) - 1)
#define PACKED_BAD_BITS (~(PACKED_HAS_PARENT | MAX_POSITION))

/* Whether `key` is in the ascending array `ordered[0..count)`. */
static int sorted_contains(const uint64_t *ordered, Py_ssize_t count, uint64_t key) {
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t mid = low + (high - low) / 2;
        if (ordered[mid] < key) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    return low < count && ordered[low] == key;
}

/* `starts` as message starts of `count` items: 0, then ascending, each below `count`; -1 with
   ValueError otherwise. Fills out[0..n) (n = its length, at most `room`). */
static Py_ssize_t get_starts(PyObject *starts, Py_ssize_t count, Py_ssize_t *out,
                             Py_ssize_t room) {
    if (!PyList_Check(starts)) {
        PyErr_SetString(PyExc_TypeError, "packed_screen: starts must be a list of ints");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(starts);
    if (n < 1 || n > room) {
        PyErr_SetString(PyExc_ValueError, "packed_screen: starts must be 0, then ascending");
        return -1;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(starts, j));
        if (at == -1 && PyErr_Occurred()) {
            return -1;
        }
        if ((j == 0 && at != 0) || (j > 0 && at <= out[j - 1]) || at >= count) {
            PyErr_SetString(PyExc_ValueError,
                            "packed_screen: starts must be 0, then ascending, below the count");
            return -1;
        }
        out[j] = at;
    }
    return n;
}

static Py_ssize_t screen_items(const uint64_t *words, Py_ssize_t count, const Py_ssize_t *starts,
                               Py_ssize_t num_starts, const uint64_t *ordered,
                               Py_ssize_t num_ordered, uint64_t *max_position) {
    uint64_t top = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        uint64_t meta = words[4 * k + 3];
        if ((meta & PACKED_BAD_BITS) || (!(meta & PACKED_HAS_PARENT) && words[4 * k + 1])) {
            return -1;
        }
        if ((meta & MAX_POSITION) > top) {
            top = meta & MAX_POSITION;
        }
    }
    for (Py_ssize_t k = 1; k < num_ordered; k++) {
        if (ordered[k] == ordered[k - 1]) {
            return -2;
        }
    }
    *max_position = top;
    Py_ssize_t next = 1; /* the next message start after item 0 */
    for (Py_ssize_t k = 1; k < count; k++) {
        if (next < num_starts && starts[next] == k) {
            next++;
            continue;
        }
        uint64_t meta = words[4 * k + 3], before = words[4 * (k - 1) + 3];
        if (!(meta & PACKED_HAS_PARENT) || words[4 * k + 1] != words[4 * (k - 1)] ||
            (meta & MAX_POSITION) != (before & MAX_POSITION) + 1) {
            return 0;
        }
    }
    for (Py_ssize_t j = 0; j < num_starts; j++) {
        Py_ssize_t k = starts[j];
        if ((words[4 * k + 3] & PACKED_HAS_PARENT) &&
            sorted_contains(ordered, num_ordered, words[4 * k + 1])) {
            return 0;
        }
    }
    return 1;
}

static const item_spec SCREEN_ARGS[2] = {{8, U64_FORMATS, 0, "items"},
                                         {8, U64_FORMATS, 0, "ordered"}};

static PyObject *packed_screen(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "packed_screen(items, starts, ordered)");
        return NULL;
    }
    PyObject *bufs[2] = {args[0], args[2]};
    Py_buffer v[2];
    if (get_all(bufs, v, SCREEN_ARGS, 2) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t *starts = NULL;
    Py_ssize_t words = v[0].len / 8;
    Py_ssize_t count = words / 4;
    if (count == 0 || words % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "packed_screen: items must be 4 words each, at least one");
        goto done;
    }
    Py_ssize_t room = PyList_Check(args[1]) ? PyList_GET_SIZE(args[1]) : 0;
    starts = PyMem_New(Py_ssize_t, room > 0 ? room : 1);
    if (starts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t num_starts = get_starts(args[1], count, starts, room);
    if (num_starts < 0) {
        goto done;
    }
    uint64_t max_position = 0;
    Py_ssize_t verdict = screen_items((const uint64_t *)v[0].buf, count, starts, num_starts,
                                      (const uint64_t *)v[1].buf, v[1].len / 8, &max_position);
    result = Py_BuildValue("(nK)", verdict, (unsigned long long)max_position);
done:
    PyMem_Free(starts);
    release_all(v, 2);
    return result;
}

/* -- slot field writes of the directory ----------------------------------------------------- */

#define STATE_FREE 0
#define STATE_RESERVED 1
#define STATE_READY 2

/* Index of the first k with idx[k] outside 0..capacity-1, or -1. */
static Py_ssize_t first_outside(const int64_t *idx, Py_ssize_t count, Py_ssize_t capacity) {
    for (Py_ssize_t k = 0; k < count; k++) {
        if (idx[k] < 0 || idx[k] >= capacity) {
            return k;
        }
    }
    return -1;
}

static const item_spec CHECK_ARGS[3] = {
    {1, "b", 0, "state"}, {2, "h", 0, "owner"}, {8, I64_FORMATS, 0, "idx"}};

static PyObject *check_reserved(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "check_reserved(state, owner, idx, owners, scratch)");
        return NULL;
    }
    Py_buffer v[5];
    if (get_all(args, v, CHECK_ARGS, 3) < 0) {
        return NULL;
    }
    int have_owners = 0, have_scratch = 0;
    PyObject *result = NULL;
    int64_t one_owner = 0;
    Py_ssize_t count = v[2].len / 8, capacity = v[0].len;
    if (PyLong_Check(args[3])) {
        one_owner = PyLong_AsLongLong(args[3]);
        if (one_owner == -1 && PyErr_Occurred()) {
            goto done;
        }
    } else {
        if (get_items(args[3], &v[3], 8, I64_FORMATS, 0, "owners") < 0) {
            goto done;
        }
        have_owners = 1;
        if (v[3].len / 8 != count) {
            PyErr_SetString(PyExc_ValueError, "check_reserved: owners and idx differ in length");
            goto done;
        }
    }
    if (get_items(args[4], &v[4], 8, I64_FORMATS, 1, "scratch") < 0) {
        goto done;
    }
    have_scratch = 1;
    if (v[1].len / 2 != capacity || v[4].len / 8 < capacity) {
        PyErr_SetString(PyExc_ValueError, "check_reserved: columns of different sizes");
        goto done;
    }
    const int8_t *state = (const int8_t *)v[0].buf;
    const int16_t *owner = (const int16_t *)v[1].buf;
    const int64_t *idx = (const int64_t *)v[2].buf;
    const int64_t *owners = have_owners ? (const int64_t *)v[3].buf : NULL;
    int64_t *scratch = (int64_t *)v[4].buf;
    Py_ssize_t at = first_outside(idx, count, capacity);
    if (at >= 0) {
        result = Py_BuildValue("(in)", 1, at);
        goto done;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t want = owners == NULL ? one_owner : owners[k];
        if (state[idx[k]] != STATE_RESERVED || (int64_t)owner[idx[k]] != want) {
            result = Py_BuildValue("(in)", 2, k);
            goto done;
        }
    }
    for (Py_ssize_t k = count - 1; k >= 0; k--) { /* the first occurrence of a slot wins */
        scratch[idx[k]] = k;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        if (scratch[idx[k]] != k) {
            result = Py_BuildValue("(in)", 3, k);
            goto done;
        }
    }
    result = Py_BuildValue("(in)", 0, (Py_ssize_t)-1);
done:
    if (have_scratch) {
        PyBuffer_Release(&v[4]);
    }
    if (have_owners) {
        PyBuffer_Release(&v[3]);
    }
    release_all(v, 3);
    return result;
}

/* publish_slots: the segment's columns, in `fields` order */
static const item_spec FIELD_SPECS[7] = {
    {8, U64_FORMATS, 1, "seq_hash"}, {8, U64_FORMATS, 1, "parent_hash"}, {1, "B", 1, "flags"},
    {8, U64_FORMATS, 1, "local_hash"}, {4, "i", 1, "position"}, {4, "I", 1, "tokens"},
    {1, "b", 1, "state"}};

static PyObject *publish_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "publish_slots(fields, idx, seqs, parents, has_parent, "
                                         "locals, positions, tokens)");
        return NULL;
    }
    if (!PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 7) {
        PyErr_SetString(PyExc_TypeError, "publish_slots: fields must be a tuple of 7 columns");
        return NULL;
    }
    Py_buffer f[7], cols[6], tok;
    int num_cols = 0, have_tokens = 0;
    PyObject *result = NULL;
    PyObject *field_objs[7];
    for (int c = 0; c < 7; c++) {
        field_objs[c] = PyTuple_GET_ITEM(args[0], c);
    }
    if (get_all(field_objs, f, FIELD_SPECS, 7) < 0) {
        return NULL;
    }
    if (get_items(args[1], &cols[0], 8, I64_FORMATS, 0, "idx") < 0) {
        goto done;
    }
    num_cols = 1;
    static const char *const names[5] = {"seqs", "parents", "has_parent", "locals", "positions"};
    static const char *const formats[5] = {U64_FORMATS, U64_FORMATS, "?", U64_FORMATS,
                                           I64_FORMATS};
    static const Py_ssize_t sizes[5] = {8, 8, 1, 8, 8};
    for (int c = 0; c < 5; c++) {
        if (get_column_of(args[2 + c], &cols[1 + c], sizes[c], formats[c], names[c]) < 0) {
            goto done;
        }
        num_cols++;
    }
    if (args[7] != Py_None) {
        if (get_items(args[7], &tok, 4, "I", 0, "tokens") < 0) {
            goto done;
        }
        have_tokens = 1;
    }
    Py_ssize_t capacity = f[6].len, count = cols[0].len / 8;
    Py_ssize_t block_size = capacity > 0 ? f[5].len / 4 / capacity : 0;
    int sizes_ok = f[0].len / 8 == capacity && f[1].len / 8 == capacity && f[2].len == capacity &&
                   f[3].len / 8 == capacity && f[4].len / 4 == capacity &&
                   block_size * capacity * 4 == f[5].len;
    for (int c = 1; c < 6; c++) {
        sizes_ok = sizes_ok && cols[c].shape[0] == count;
    }
    if (!sizes_ok || (have_tokens && tok.len / 4 != count * block_size)) {
        PyErr_SetString(PyExc_ValueError, "publish_slots: columns of different lengths");
        goto done;
    }
    const int64_t *idx = (const int64_t *)cols[0].buf;
    if (first_outside(idx, count, capacity) >= 0) {
        PyErr_SetString(PyExc_ValueError, "publish_slots: a slot outside the pool");
        goto done;
    }
    uint64_t *seq_hash = (uint64_t *)f[0].buf, *parent_hash = (uint64_t *)f[1].buf;
    uint8_t *flags = (uint8_t *)f[2].buf;
    uint64_t *local_hash = (uint64_t *)f[3].buf;
    int32_t *position = (int32_t *)f[4].buf;
    uint32_t *tokens = (uint32_t *)f[5].buf;
    int8_t *state = (int8_t *)f[6].buf;
    size_t row_bytes = (size_t)block_size * 4;
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t slot = idx[k];
        seq_hash[slot] = COLUMN_AT(cols[1], k);
        parent_hash[slot] = COLUMN_AT(cols[2], k);
        flags[slot] = *((const uint8_t *)cols[3].buf + k * cols[3].strides[0]) ? 1 : 0;
        local_hash[slot] = COLUMN_AT(cols[4], k);
        position[slot] = (int32_t)(int64_t)COLUMN_AT(cols[5], k);
        if (have_tokens) {
            memcpy(tokens + slot * block_size, (const char *)tok.buf + k * row_bytes, row_bytes);
        } else {
            memset(tokens + slot * block_size, 0, row_bytes);
        }
    }
    /* INVARIANT: every field is written before state turns READY */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (Py_ssize_t k = 0; k < count; k++) {
        state[idx[k]] = STATE_READY;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (have_tokens) {
        PyBuffer_Release(&tok);
    }
    release_all(cols, num_cols);
    release_all(f, 7);
    return result;
}

static const item_spec RELEASE_ARGS[4] = {{8, I64_FORMATS, 1, "gen"},
                                          {2, "h", 1, "owner"},
                                          {1, "b", 1, "state"},
                                          {8, I64_FORMATS, 0, "idx"}};

static PyObject *release_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "release_slots(gen, owner, state, idx)");
        return NULL;
    }
    Py_buffer v[4];
    if (get_all(args, v, RELEASE_ARGS, 4) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t capacity = v[2].len, count = v[3].len / 8;
    const int64_t *idx = (const int64_t *)v[3].buf;
    if (v[0].len / 8 != capacity || v[1].len / 2 != capacity) {
        PyErr_SetString(PyExc_ValueError, "release_slots: columns of different sizes");
    } else if (first_outside(idx, count, capacity) >= 0) {
        PyErr_SetString(PyExc_ValueError, "release_slots: a slot outside the pool");
    } else {
        int64_t *gen = (int64_t *)v[0].buf;
        int16_t *owner = (int16_t *)v[1].buf;
        int8_t *state = (int8_t *)v[2].buf;
        for (Py_ssize_t k = 0; k < count; k++) {
            gen[idx[k]] += 1;
            owner[idx[k]] = -1;
        }
        /* INVARIANT: gen before state */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        for (Py_ssize_t k = 0; k < count; k++) {
            state[idx[k]] = STATE_FREE;
        }
        result = Py_None;
        Py_INCREF(result);
    }
    release_all(v, 4);
    return result;
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
    {"check_reserved", (PyCFunction)(void (*)(void))check_reserved, METH_FASTCALL,
     "check_reserved(state, owner, idx, owners, scratch) -> (problem, k) (see _g2index.c)"},
    {"publish_slots", (PyCFunction)(void (*)(void))publish_slots, METH_FASTCALL,
     "publish_slots(fields, idx, seqs, parents, has_parent, locals, positions, tokens)"},
    {"release_slots", (PyCFunction)(void (*)(void))release_slots, METH_FASTCALL,
     "release_slots(gen, owner, state, idx): gen + 1, owner -1, then state FREE"},
    {"packed_screen", (PyCFunction)(void (*)(void))packed_screen, METH_FASTCALL,
     "packed_screen(items, starts, ordered) -> (verdict, max_position) (see _g2index.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef g2index_module = {
    PyModuleDef_HEAD_INIT, "shmkv._g2index",
    "The G2 coordinator's index probing in C (see _g2index.c).", -1,
    g2index_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__g2index(void) { return PyModule_Create(&g2index_module); }
