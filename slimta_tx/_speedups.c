/*
 * slimta_tx._speedups: the DATA decoder's hot loop in one pass over the bytes.
 *
 * scan(work, start, find_end, unstuff, max_line) looks at the complete lines of `work` from
 * offset `start` and, when every CR and LF in them belongs to a CRLF pair, returns
 *
 *     (out, stop, ended, long_line)
 *
 *   out        the lines with their leading dot removed (when `unstuff`), ready to store;
 *   stop       the offset just past what `out` covers: past the last LF, or past the
 *              "." CRLF that ends the data;
 *   ended      True when a line "." CRLF that follows a real CRLF was found (`find_end`);
 *   long_line  True when a line as stored (its leading dot removed when `unstuff`, CRLF
 *              included) is longer than `max_line` octets (0: no limit). RFC 5321
 *              4.5.3.1.6 counts a text line without the dot duplicated for transparency.
 *
 * It returns None as soon as it meets a bare CR or LF, or a state it does not handle; the
 * caller then decodes the same bytes with the pure-Python code, which owns every rule for
 * such input. This function only ever claims clean input, where the rules are simple:
 * lines end with CRLF, a line that starts after a CRLF may be dot-stuffed, and the end of
 * data is a line that is exactly "." CRLF.
 *
 * `start` is the length of the head that precedes the new bytes: 2 when `work` starts with a
 * real CRLF (so offset 2 is a line start), 0 when offset 0 is inside a line. Nothing before
 * `start` is read except to check that head.
 *
 * Memory safety: every read is inside [0, n) of one immutable bytes object, checked before it
 * is made; `out` is allocated once at the largest size it can reach (stop - start) and only
 * shrinks. tests/test_data_accel.py compares this with the Python decoder on hostile input,
 * and tests/fuzz/ holds a libFuzzer harness for sanitizer builds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#ifndef SLIMTA_SOURCE_HASH
#define SLIMTA_SOURCE_HASH "unknown"
#endif

/* memrchr is a GNU extension; this is portable and only runs once per call. */
static const char *
last_lf(const char *from, Py_ssize_t length)
{
    const char *p = from + length;
    while (p > from) {
        --p;
        if (*p == '\n') {
            return p;
        }
    }
    return NULL;
}

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan() takes exactly 5 arguments");
        return NULL;
    }
    PyObject *work = args[0];
    if (!PyBytes_CheckExact(work)) {
        PyErr_SetString(PyExc_TypeError, "scan() needs bytes");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int find_end = PyObject_IsTrue(args[2]);
    int unstuff = PyObject_IsTrue(args[3]);
    if (find_end < 0 || unstuff < 0) {
        return NULL;
    }
    Py_ssize_t max_line = PyLong_AsSsize_t(args[4]);
    if (max_line == -1 && PyErr_Occurred()) {
        return NULL;
    }

    const char *buf = PyBytes_AS_STRING(work);
    Py_ssize_t n = PyBytes_GET_SIZE(work);
    if (start == 2) {
        if (n < 2 || buf[0] != '\r' || buf[1] != '\n') {
            PyErr_SetString(PyExc_ValueError, "scan(): a head of 2 bytes must be CRLF");
            return NULL;
        }
    }
    else if (start != 0) {
        PyErr_SetString(PyExc_ValueError, "scan(): start must be 0 or 2");
        return NULL;
    }
    if (max_line < 0) {
        PyErr_SetString(PyExc_ValueError, "scan(): max_line must be >= 0");
        return NULL;
    }

    /* Only complete lines are decoded: the bytes after the last LF wait for more input. */
    const char *lf_last = last_lf(buf + start, n - start);
    Py_ssize_t cut = lf_last ? (Py_ssize_t)(lf_last - buf) + 1 : start;

    PyObject *out = PyBytes_FromStringAndSize(NULL, cut - start);
    if (out == NULL) {
        return NULL;
    }
    char *o = PyBytes_AS_STRING(out);
    Py_ssize_t olen = 0;
    Py_ssize_t copy_from = start; /* bytes [copy_from, p) are still to be copied to out */
    Py_ssize_t p = start;         /* the start of the current line (or of the body) */
    int at_line_start = (start == 2);
    int ended = 0;
    int long_line = 0;
    Py_ssize_t stop = cut;

    while (p < cut) {
        Py_ssize_t content = p; /* where the line starts as stored (past a stuffed dot) */
        if (at_line_start && buf[p] == '.') {
            if (find_end && p + 2 < n && buf[p + 1] == '\r' && buf[p + 2] == '\n') {
                /* "." CRLF after a real CRLF: the end of data. out covers [start, p). */
                memcpy(o + olen, buf + copy_from, (size_t)(p - copy_from));
                olen += p - copy_from;
                copy_from = p;
                stop = p + 3;
                ended = 1;
                break;
            }
            if (unstuff) {
                memcpy(o + olen, buf + copy_from, (size_t)(p - copy_from));
                olen += p - copy_from;
                copy_from = p + 1; /* drop the stuffed dot */
                content = p + 1;
            }
        }
        /* An LF exists in [p, cut): cut - 1 is one. */
        const char *lf = memchr(buf + p, '\n', (size_t)(cut - p));
        Py_ssize_t l = (Py_ssize_t)(lf - buf);
        /* Clean means: the LF follows a CR inside this line, and no other CR is in it. */
        if (l == p || buf[l - 1] != '\r' || memchr(buf + p, '\r', (size_t)(l - 1 - p)) != NULL) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        /* Stored, the line is [content, l] plus the LF: l - content + 1 octets. */
        if (max_line && l - content >= max_line) {
            long_line = 1;
        }
        at_line_start = 1;
        p = l + 1;
    }
    if (!ended) {
        memcpy(o + olen, buf + copy_from, (size_t)(cut - copy_from));
        olen += cut - copy_from;
    }
    if (olen != cut - start && _PyBytes_Resize(&out, olen) < 0) {
        return NULL;
    }
    PyObject *result = Py_BuildValue(
        "(NnOO)", out, stop, ended ? Py_True : Py_False, long_line ? Py_True : Py_False);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(work, start, find_end, unstuff, max_line) -> (out, stop, ended, long_line) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "slimta_tx._speedups",
    "The DATA decoder's hot loop in C (see slimta_tx/data.py for the rules).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddStringConstant(module, "SOURCE_HASH", SLIMTA_SOURCE_HASH) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
