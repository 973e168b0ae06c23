/* Native packet path for Opus streams: WebSocket framing, unmasking, RFC 6716 checks and libopus
 * decoding of a connection's audio frames, without a Python call per packet.
 *
 * Why: a device sends 100 Opus packets a second. In Python each one costs ~12 us of framing,
 * unmasking, checks, a ctypes call and numpy bookkeeping around the ~6.5 us libopus spends, and
 * at a few hundred streams per core that, not the audio, fills the core (bench/bench_scale.py).
 *
 * What it does: OpusPacketReader.scan(data, pos, limit) walks the WebSocket frames of `data`
 * from `pos` and decodes each one that is the common case: a complete, final, masked binary
 * frame of 3..max_message bytes whose TOC byte the stream's signature admitted (allow(); see
 * codecs/signature.py), whose payload passes the RFC 6716 section 3.4 framing rules and which
 * decodes to the number of samples its TOC promises. The samples gather in one buffer; when a
 * piece's worth is there, `on_piece()` is called and the owner takes it with take().
 * scan stops at the first frame that is anything else (text, control, fragment, keepalive,
 * oversized, not a valid Opus packet, or incomplete) and returns its offset: the Python path
 * (gateway/ws_protocol.py, codecs/opus.py) handles that frame with its full rules and error
 * messages, then may call scan again. So this file only ever accelerates what Python would
 * have accepted, and never decides an error.
 *
 * libopus is not linked: the reader calls the opus_decode that opuslib already loaded, on the
 * decoder state opuslib created (both passed as addresses), so the Python path and this one
 * share one decoder and the stream's state stays continuous whichever path takes a packet.
 * `owner` (the opuslib Decoder) is kept referenced so that state cannot be freed under us.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*opus_decode_fn)(void *state, const unsigned char *data, int32_t len,
                              int16_t *pcm, int frame_size, int decode_fec);

#define MAX_PACKET_MS 120
#define MAX_FRAME_BYTES 1275
#define FIN_BINARY 0x82
/* The in-band FEC (LBRR) flag of a 10 or 20 ms SILK or hybrid packet: bit 6 of its first payload
 * byte. A device that sends no FEC never sets it; random bytes do half of the time. Once
 * FEC_LEARN packets were decoded without it, a packet with it set is left to the Python path
 * (codecs/signature.py SteadyFlag), which drops it unless the stream turns out to use FEC. */
#define FEC_BIT 0x40
#define FEC_LEARN 100

/* Duration of one frame in 48 kHz samples by TOC configuration (RFC 6716 section 3.1). */
static const int FRAME_48K[32] = {
    480, 960, 1920, 2880, 480, 960, 1920, 2880, 480, 960, 1920, 2880,
    480, 960, 480, 960,
    120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960,
};

/* One frame length at *pos (section 3.2.1); -1 when the packet ends inside it. */
static int frame_length(const unsigned char *p, Py_ssize_t size, Py_ssize_t *pos) {
    if (*pos >= size) return -1;
    int first = p[*pos];
    if (first < 252) { *pos += 1; return first; }
    if (*pos + 1 >= size) return -1;
    int length = first + 4 * p[*pos + 1];
    *pos += 2;
    return length;
}

/* Audio in the packet in 48 kHz samples, or -1 when it breaks a rule of section 3.4. Mirrors
 * opus_packet_duration in codecs/opus.py, which names the broken rule. */
static int packet_duration(const unsigned char *p, Py_ssize_t size) {
    if (size < 1) return -1;
    int toc = p[0];
    int frame = FRAME_48K[toc >> 3];
    int code = toc & 3, count;
    if (code == 0) {
        count = 1;
        if (size - 1 > MAX_FRAME_BYTES) return -1;
    } else if (code == 1) {
        count = 2;
        if ((size - 1) % 2 || (size - 1) / 2 > MAX_FRAME_BYTES) return -1;
    } else if (code == 2) {
        count = 2;
        Py_ssize_t pos = 1;
        int first = frame_length(p, size, &pos);
        if (first < 0 || first > size - pos || size - pos - first > MAX_FRAME_BYTES) return -1;
    } else {
        if (size < 2) return -1;
        int count_byte = p[1];
        count = count_byte & 0x3F;
        if (count == 0) return -1;
        Py_ssize_t pos = 2, padding = 0;
        if (count_byte & 0x40) {
            for (;;) {
                if (pos >= size) return -1;
                int value = p[pos++];
                padding += value == 255 ? 254 : value;
                if (value != 255) break;
            }
        }
        if (count_byte & 0x80) {
            Py_ssize_t coded = 0;
            for (int i = 0; i < count - 1; i++) {
                int length = frame_length(p, size, &pos);
                if (length < 0) return -1;
                coded += length;
            }
            Py_ssize_t last = size - pos - padding - coded;
            if (last < 0 || last > MAX_FRAME_BYTES) return -1;
        } else {
            Py_ssize_t payload = size - pos - padding;
            if (payload < 0 || payload % count || payload / count > MAX_FRAME_BYTES) return -1;
        }
    }
    int duration = count * frame;
    if (duration > 48 * MAX_PACKET_MS) return -1;
    return duration;
}

typedef struct {
    PyObject_HEAD
    PyObject *owner;           /* keeps the decoder state alive; NULL once closed */
    PyObject *on_piece;
    void *state;
    opus_decode_fn decode;
    int rate;                  /* the decoder's output rate */
    int max_samples;           /* per packet: rate * 120 ms */
    Py_ssize_t max_message;    /* larger messages go to the Python path */
    Py_ssize_t piece;          /* samples that make a piece */
    int16_t *pcm;              /* decoded, not yet taken */
    Py_ssize_t samples, capacity;
    unsigned char *payload;    /* one unmasked message */
    Py_ssize_t payload_capacity;
    unsigned long long messages, bytes;
    unsigned long long decoded;  /* packets decoded here, never reset: the Python path's ordering mark */
    double last_arrival;       /* CLOCK_MONOTONIC seconds, as Python's time.monotonic() */
    unsigned char allowed[256];/* TOC bytes the stream's signature admitted; others go to Python */
    int any_allowed;           /* 0 until a TOC is allowed: the stream's first packet then defines one */
    int leave_next;            /* Python held a packet back: leave it the next one, which may confirm it */
    int first_toc, first_samples; /* that first packet's TOC and samples, for the Python signature */
    unsigned long long python_decoded; /* packets the Python path decoded (decoded_here) */
    unsigned long long fec_seen;       /* packets decoded with the FEC flag set, here or there */
} Reader;

static int fec_flag(const unsigned char *p, Py_ssize_t size) {
    return size > 1 && (p[0] >> 3) < 16 && (p[1] & FEC_BIT);
}

static int fec_free(const Reader *self) {
    return self->fec_seen == 0 && self->decoded + self->python_decoded >= FEC_LEARN;
}

static int ensure_pcm(Reader *self, Py_ssize_t need) {
    if (need <= self->capacity) return 0;
    Py_ssize_t capacity = self->capacity ? self->capacity : 4096;
    while (capacity < need) capacity *= 2;
    int16_t *grown = PyMem_Realloc(self->pcm, capacity * sizeof(int16_t));
    if (!grown) { PyErr_NoMemory(); return -1; }
    self->pcm = grown;
    self->capacity = capacity;
    return 0;
}

static int ensure_payload(Reader *self, Py_ssize_t need) {
    if (need <= self->payload_capacity) return 0;
    unsigned char *grown = PyMem_Realloc(self->payload, need);
    if (!grown) { PyErr_NoMemory(); return -1; }
    self->payload = grown;
    self->payload_capacity = need;
    return 0;
}

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int Reader_init(Reader *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"owner", "state", "decode", "rate", "max_message", "piece", "on_piece", NULL};
    PyObject *owner, *on_piece;
    unsigned long long state, decode;
    int rate;
    Py_ssize_t max_message, piece;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OKKinnO", names, &owner, &state, &decode, &rate,
                                     &max_message, &piece, &on_piece))
        return -1;
    if (!state || !decode) { PyErr_SetString(PyExc_ValueError, "null decoder state or function"); return -1; }
    if (rate <= 0 || rate > 48000 || piece <= 0 || max_message < 0) {
        PyErr_SetString(PyExc_ValueError, "rate, piece or max_message out of range");
        return -1;
    }
    if (!PyCallable_Check(on_piece)) { PyErr_SetString(PyExc_TypeError, "on_piece must be callable"); return -1; }
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    Py_INCREF(on_piece);
    Py_XSETREF(self->on_piece, on_piece);
    self->state = (void *)(uintptr_t)state;
    self->decode = (opus_decode_fn)(uintptr_t)decode;
    self->rate = rate;
    self->max_samples = rate * MAX_PACKET_MS / 1000;
    self->max_message = max_message;
    self->piece = piece;
    self->first_toc = -1;
    return 0;
}

static void Reader_dealloc(Reader *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->on_piece);
    PyMem_Free(self->pcm);
    PyMem_Free(self->payload);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* scan(data, pos, limit) -> offset of the first frame left to the Python path (len(data) when none). */
static PyObject *Reader_scan(Reader *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, limit;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &pos, &limit)) return NULL;
    const unsigned char *d = view.buf;
    Py_ssize_t size = view.len;
    Py_ssize_t max_payload = self->max_message;
    if (limit >= 0 && limit < max_payload) max_payload = limit;
    double now = -1;
    while (self->owner != NULL && pos >= 0 && size - pos >= 6) {
        unsigned char first = d[pos], second = d[pos + 1];
        if (first != FIN_BINARY || !(second & 0x80)) break;
        Py_ssize_t length = second & 0x7F, head = 2;
        if (length == 127) break;
        if (length == 126) {
            if (size - pos < 8) break;
            length = (d[pos + 2] << 8) | d[pos + 3];
            head = 4;
        }
        head += 4;
        Py_ssize_t end = pos + head + length;
        if (end > size || length <= 2 || length > max_payload) break;
        if (ensure_payload(self, length) < 0 || ensure_pcm(self, self->samples + self->max_samples) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        const unsigned char *mask = d + pos + head - 4, *src = d + pos + head;
        if (self->leave_next) { self->leave_next = 0; break; }
        int toc = src[0] ^ mask[0];
        if (!self->allowed[toc] && self->any_allowed) break;   /* a TOC the stream has not sent: Python decides */
        for (Py_ssize_t i = 0; i < length; i++) self->payload[i] = src[i] ^ mask[i & 3];
        int duration = packet_duration(self->payload, length);
        if (duration < 0) break;
        int flagged = fec_flag(self->payload, length);
        if (flagged && fec_free(self)) break;   /* an FEC flag this stream never sets: Python decides */
        int expected = (int)((long long)duration * self->rate / 48000);
        int count = self->decode(self->state, self->payload, (int32_t)length, self->pcm + self->samples,
                                 self->max_samples, 0);
        if (count != expected) break;   /* libopus refused it: the Python path reports the error */
        if (!self->any_allowed) {       /* the stream's first packet defines its signature (codecs/signature.py) */
            self->allowed[toc] = 1;
            self->any_allowed = 1;
            self->first_toc = toc;
            self->first_samples = count;
        }
        if (now < 0) now = monotonic_now();
        self->fec_seen += flagged;
        self->samples += count;
        self->messages += 1;
        self->decoded += 1;
        self->bytes += length;
        self->last_arrival = now;
        pos = end;
        if (self->samples >= self->piece) {
            PyObject *result = PyObject_CallNoArgs(self->on_piece);
            if (result == NULL) PyErr_WriteUnraisable(self->on_piece);   /* the owner's bug must not stop the socket */
            Py_XDECREF(result);
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
}

/* take() -> (bytes of int16 samples, messages, bytes, last arrival): what gathered since the last take.
 * Bytes, not a bytearray: numpy views a bytearray through a memoryview, which the garbage collector
 * tracks, and the session keeps ~30 s of pieces per stream (replay buffer), so at 300 streams the
 * collector walked ~450,000 memoryviews and their managed buffers in every full collection (~200 ms
 * pauses). A view of bytes is not tracked; with nothing decoded this returns the shared empty bytes. */
static PyObject *Reader_take(Reader *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *pcm = PyBytes_FromStringAndSize((const char *)self->pcm, self->samples * sizeof(int16_t));
    if (!pcm) return NULL;
    PyObject *result = Py_BuildValue("NKKd", pcm, self->messages, self->bytes, self->last_arrival);
    if (result) {
        self->samples = 0;
        self->messages = 0;
        self->bytes = 0;
    }
    return result;
}

/* close(): decode nothing more (every later frame goes to the Python path) and let the decoder go. */
static PyObject *Reader_close(Reader *self, PyObject *Py_UNUSED(ignored)) {
    Py_CLEAR(self->owner);
    self->state = NULL;
    Py_RETURN_NONE;
}

/* allow(toc): decode packets with this TOC byte here from now on (the signature admitted it). */
static PyObject *Reader_allow(Reader *self, PyObject *arg) {
    long toc = PyLong_AsLong(arg);
    if (toc == -1 && PyErr_Occurred()) return NULL;
    if (toc < 0 || toc > 255) { PyErr_SetString(PyExc_ValueError, "a TOC byte is 0..255"); return NULL; }
    self->allowed[toc] = 1;
    self->any_allowed = 1;
    Py_RETURN_NONE;
}

/* leave_next(): let the Python path have the next audio frame (it confirms or drops a held packet). */
static PyObject *Reader_leave_next(Reader *self, PyObject *Py_UNUSED(ignored)) {
    self->leave_next = 1;
    Py_RETURN_NONE;
}

/* decoded_here(packet): the Python path decoded this packet (counts towards the FEC flag's rule). */
static PyObject *Reader_decoded_here(Reader *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    self->python_decoded += 1;
    self->fec_seen += fec_flag(view.buf, view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Reader_fec_free(Reader *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(fec_free(self));
}

static PyObject *Reader_packets(Reader *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(self->decoded + self->python_decoded);
}

static PyObject *Reader_pending(Reader *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->samples);
}

static PyObject *Reader_first_packet(Reader *self, void *Py_UNUSED(closure)) {
    if (self->first_toc < 0) Py_RETURN_NONE;
    return Py_BuildValue("ii", self->first_toc, self->first_samples);
}

static PyObject *Reader_decoded(Reader *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(self->decoded);
}

static PyObject *Reader_closed(Reader *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->owner == NULL);
}

static PyMethodDef Reader_methods[] = {
    {"scan", (PyCFunction)Reader_scan, METH_VARARGS,
     "scan(data, pos, limit) -> offset of the first frame left to the Python path"},
    {"take", (PyCFunction)Reader_take, METH_NOARGS,
     "take() -> (pcm bytes, messages, bytes, last arrival) since the last take"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "decode nothing more; release the decoder"},
    {"allow", (PyCFunction)Reader_allow, METH_O, "allow(toc): decode packets with this TOC byte here"},
    {"leave_next", (PyCFunction)Reader_leave_next, METH_NOARGS, "leave the next audio frame to the Python path"},
    {"decoded_here", (PyCFunction)Reader_decoded_here, METH_O, "decoded_here(packet): the Python path decoded it"},
    {NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"pending", (getter)Reader_pending, NULL, "samples decoded and not yet taken", NULL},
    {"closed", (getter)Reader_closed, NULL, "True once close() was called", NULL},
    {"decoded", (getter)Reader_decoded, NULL, "packets decoded by this reader so far", NULL},
    {"packets", (getter)Reader_packets, NULL, "packets decoded here and by the Python path", NULL},
    {"fec_free", (getter)Reader_fec_free, NULL,
     "True once FEC_LEARN packets were decoded and none had the in-band FEC flag set", NULL},
    {"first_packet", (getter)Reader_first_packet, NULL,
     "(TOC, samples) of the stream's first packet when this reader decoded it, else None", NULL},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "harken.native._opus_reader.OpusPacketReader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Frames, unmasks, checks and decodes a connection's Opus WebSocket frames (see the module source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};

/* packet_duration(packet) -> 48 kHz samples, or -1: the C twin of codecs.opus.opus_packet_duration, for tests. */
static PyObject *py_packet_duration(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    int duration = packet_duration(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromLong(duration);
}

static PyMethodDef module_methods[] = {
    {"packet_duration", py_packet_duration, METH_O, "48 kHz samples in an Opus packet, -1 when malformed"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_opus_reader", "Native packet path for Opus streams.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__opus_reader(void) {
    if (PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "OpusPacketReader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
