/* One LC3 frame of one channel decoded with the probe of harken/codecs/lc3.py (_decode_frames),
 * in one call: the two changed frames (the first probed set bit cleared, the last pair of lines
 * dropped) decoded from the state before the frame, each undone, then the frame itself, and the
 * 16-bit samples compared. It calls the liblc3 that lc3py ships (through the address of its
 * lc3_decode, as opus_reader.c calls libopus), so it needs no liblc3 headers. The Python path
 * in lc3.py does the same in several ctypes calls; this saves their overhead (most of the
 * decoder's cost beside liblc3's own). The comparisons before rounding stay in Python: they are
 * rare (a frame that rounds to the same samples). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*lc3_decode_fn)(void *decoder, const void *in, int nbytes, int fmt, void *pcm, int stride);

#define MAX_FRAME 400        /* LC3_MAX_FRAME_BYTES */
#define PCM_S16 0

/* The first set bit of frame from bit start (byte start / 8, least significant bit first)
 * below bit end, or -1 (lc3.py's probe_bit). */
static Py_ssize_t first_set_bit(const unsigned char *frame, Py_ssize_t start, Py_ssize_t end) {
    for (Py_ssize_t bit = start; bit < end; bit++)
        if (frame[bit >> 3] >> (bit & 7) & 1)
            return bit;
    return -1;
}

/* probe(decode, handle, memory, before, size, frame, probe, start, window, field_position,
 *       field_width, pcm, probe_first, probe_last, samples)
 * -> (status, first, second, first_same, last_same)
 * memory: the channel's decoder state (before the frame on entry, after it on return);
 * before: a copy of that state; pcm: where the frame's samples go (mono); probe_first,
 * probe_last: room for the changed frames' samples; probe: 0 for a frame in LSB mode (not
 * probed). first/second: the probed set bits (-1: none); first_same: the frame with bit first
 * cleared decoded to the same samples (only when second is not -1); last_same: the frame
 * with its last pair dropped did (-1: the field was already the lowest). */
static PyObject *py_probe(PyObject *self, PyObject *args) {
    unsigned long long decode, handle, memory, before, pcm, probe_first, probe_last;
    Py_ssize_t size, length, start, window, samples;
    const unsigned char *frame;
    int probe, position, width;
    if (!PyArg_ParseTuple(args, "KKKKny#pnniiKKKn", &decode, &handle, &memory, &before, &size, &frame, &length,
                          &probe, &start, &window, &position, &width, &pcm, &probe_first, &probe_last, &samples))
        return NULL;
    if (length < 2 || length > MAX_FRAME || start < 0 || window < 0 || samples <= 0 || position < 0 || width < 1
            || position + width > 16) {
        PyErr_SetString(PyExc_ValueError, "lc3 probe: bad arguments");
        return NULL;
    }
    lc3_decode_fn lc3_decode = (lc3_decode_fn)(uintptr_t)decode;
    void *state = (void *)(uintptr_t)memory;
    const void *saved = (const void *)(uintptr_t)before;
    unsigned char changed[MAX_FRAME];
    int n = (int)length;
    Py_ssize_t first = -1, second = -1;
    int last = -1, status;
    if (probe) {
        Py_ssize_t end = start + window < 8 * length ? start + window : 8 * length;
        first = first_set_bit(frame, start, end);
        second = first < 0 ? -1 : first_set_bit(frame, first + 1, end);
        unsigned tail = frame[n - 1] | (unsigned)frame[n - 2] << 8;    /* the last two bytes, from the end */
        unsigned field = tail >> position & ((1u << width) - 1);
        if (second >= 0) {
            memcpy(changed, frame, n);
            changed[first >> 3] &= (unsigned char)~(1u << (first & 7));
            lc3_decode((void *)(uintptr_t)handle, changed, n, PCM_S16, (void *)(uintptr_t)probe_first, 1);
            memcpy(state, saved, size);
        }
        if (field) {
            tail -= 1u << position;
            memcpy(changed, frame, n);
            changed[n - 1] = tail & 0xff;
            changed[n - 2] = tail >> 8 & 0xff;
            lc3_decode((void *)(uintptr_t)handle, changed, n, PCM_S16, (void *)(uintptr_t)probe_last, 1);
            memcpy(state, saved, size);
            last = 0;
        }
    }
    status = lc3_decode((void *)(uintptr_t)handle, frame, n, PCM_S16, (void *)(uintptr_t)pcm, 1);
    size_t bytes = (size_t)samples * 2;
    int first_same = status == 0 && second >= 0
                     && !memcmp((void *)(uintptr_t)probe_first, (void *)(uintptr_t)pcm, bytes);
    if (last == 0 && status == 0)
        last = !memcmp((void *)(uintptr_t)probe_last, (void *)(uintptr_t)pcm, bytes);
    return Py_BuildValue("innii", status, first, second, first_same, last);
}

static PyMethodDef module_methods[] = {
    {"probe", py_probe, METH_VARARGS, "decode one mono LC3 frame with the probe's changed frames (see lc3.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lc3_probe", "Native probe path for LC3 frames.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__lc3_probe(void) {
    return PyModule_Create(&module);
}
