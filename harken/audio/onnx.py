"""One way to open the small ONNX models of this package (Silero VAD, the speaker d-vector)."""

from __future__ import annotations

import threading


def single_thread_session(model_path: str):
    """An onnxruntime session on one thread and without a memory arena.

    One thread: the models are small, thread hand-offs would cost more than they save, and the
    cores belong to the speech engine and the other streams. No arena: it would keep the peak of
    the largest batch ever run for the whole life of the process. ``InferenceSession.run`` is
    thread-safe, so one session serves every caller.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = False
    return onnxruntime.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


class SharedModel:
    """A model loaded once per process on first use: ``Model.shared()``."""

    _shared = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls):
        """The process-wide model, loaded on the first call (by one thread only)."""
        if cls.__dict__.get("_shared") is None:
            with SharedModel._shared_lock:
                if cls.__dict__.get("_shared") is None:
                    cls._shared = cls()
        return cls._shared
