/*
 * shmkv/_pyint.h: Python ints from unsigned 64- and 128-bit values, for the core's C helpers
 * (shmkv/_blockhash.c, shmkv/_g2index.c). The stamp of scripts/build_core.py covers this file
 * (`shmkv._native.C_HEADERS`).
 *
 * On CPython 3.11 (30-bit digits, the digit count in ob_size) the digits are filled directly:
 * a third fewer instructions than PyLong_FromUnsignedLongLong's digit-counting loop, and a
 * third of `_PyLong_FromByteArray`'s byte-at-a-time work for 128 bits. Elsewhere the public
 * constructors run.
 */
#ifndef SHMKV_PYINT_H
#define SHMKV_PYINT_H

#include <Python.h>
#include <stdint.h>

/* The int `value`. */
static inline PyObject *u64_to_int(uint64_t value) {
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    if (value < (UINT64_C(1) << 30)) {
        return PyLong_FromLong((long)value); /* small ints come from CPython's cache */
    }
    const uint32_t mask = (UINT32_C(1) << 30) - 1;
    Py_ssize_t size = value >> 60 ? 3 : 2;
    PyLongObject *out = _PyLong_New(size);
    if (out == NULL) {
        return NULL;
    }
    out->ob_digit[0] = (digit)((uint32_t)value & mask);
    out->ob_digit[1] = (digit)((uint32_t)(value >> 30) & mask);
    if (size == 3) {
        out->ob_digit[2] = (digit)(value >> 60);
    }
    return (PyObject *)out;
#else
    return PyLong_FromUnsignedLongLong(value);
#endif
}

/* The int `high * 2^64 + low`. */
static inline PyObject *u128_to_int(uint64_t high, uint64_t low) {
    if (high == 0) {
        return u64_to_int(low);
    }
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    const uint32_t mask = (UINT32_C(1) << 30) - 1;
    uint32_t digits[5] = {
        (uint32_t)low & mask,
        (uint32_t)(low >> 30) & mask,
        (uint32_t)((low >> 60) | (high << 4)) & mask,
        (uint32_t)(high >> 26) & mask,
        (uint32_t)(high >> 56),
    };
    Py_ssize_t size = 5;
    while (digits[size - 1] == 0) { /* high > 0: digit 2 or above is set */
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
    for (int i = 0; i < 8; i++) {
        bytes[i] = (unsigned char)(low >> (8 * i));
        bytes[8 + i] = (unsigned char)(high >> (8 * i));
    }
    return _PyLong_FromByteArray(bytes, sizeof bytes, 1, 0);
#endif
}

#endif /* SHMKV_PYINT_H */
