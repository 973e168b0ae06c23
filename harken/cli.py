"""``harken serve | token | stream | sync``: one entry point for operators and for people trying it out."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .config import Settings, setting_fields

log = logging.getLogger("harken")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:       # bad settings: say what to fix, no traceback
        print(f"harken: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harken", description="Omi-compatible real-time transcription gateway")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the gateway", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_setting_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    token = sub.add_parser("token", help="print a local RS256 token for a user (auth=local)")
    token.add_argument("--uid", required=True)
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
    token.add_argument("--data-dir", type=Path, default=None, help="the server's data folder")
    token.set_defaults(run=_cmd_token)

    stream = sub.add_parser("stream", help="stream an audio file to a gateway like a device would")
    stream.add_argument("file", type=Path, help="a 16-bit PCM WAV file (any rate, mono or stereo)")
    stream.add_argument("--url", default="ws://127.0.0.1:8000/v4/listen")
    stream.add_argument("--codec", default="pcm16")
    stream.add_argument("--sample-rate", type=int, default=None, help="default: the codec's usual rate")
    stream.add_argument("--language", default="en")
    stream.add_argument("--token", default=os.environ.get("HARKEN_TOKEN"), help="bearer token (default: $HARKEN_TOKEN, or minted locally)")
    stream.add_argument("--uid", default="local-user", help="user for a locally minted token")
    stream.add_argument("--data-dir", type=Path, default=None, help="server data folder (to mint a local token)")
    pace = stream.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True, help="send at real-time pace (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false", help="send as fast as possible")
    stream.add_argument("--tail", type=float, default=1.5, help="seconds of silence sent after the file")
    stream.add_argument("--settle", type=float, default=2.0,
                        help="after the last message, close once no segment changed for this many seconds")
    stream.set_defaults(run=_cmd_stream)

    receive = sub.add_parser("receive-audio", help="accept the audio-bytes webhook and write WAV files per user and session")
    receive.add_argument("--dir", type=Path, required=True, help="folder for DIR/<uid>/<session>.wav")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--port", type=int, default=8081)
    receive.add_argument("--secret", default=os.environ.get("HARKEN_WEBHOOK_SECRET", ""),
                         help="verify X-Harken-Signature with this key (default: $HARKEN_WEBHOOK_SECRET)")
    receive.set_defaults(run=_cmd_receive_audio)

    sync = sub.add_parser("sync", help="upload offline recordings (the app's .bin files, or WAV) to /v1/sync-local-files")
    sync.add_argument("files", type=Path, nargs="+", help="audio_…_TIMESTAMP.bin files as the Omi app names them, or WAV")
    sync.add_argument("--url", default="http://127.0.0.1:8000")
    sync.add_argument("--token", default=None, help="bearer token (default: $HARKEN_TOKEN, or minted locally)")
    sync.add_argument("--uid", default="local-user", help="user for a locally minted token")
    sync.add_argument("--data-dir", type=Path, default=None, help="server data folder (to mint a local token)")
    sync.add_argument("--at", type=float, default=None,
                      help="Unix time a WAV file was recorded (default: its modification time minus its length)")
    sync.add_argument("--no-wait", dest="wait", action="store_false", help="return once uploaded")
    sync.set_defaults(run=_cmd_sync)

    load = sub.add_parser("loadtest", help="many device-like streams at real-time pace: latency, errors, server figures")
    load.add_argument("--url", default="ws://127.0.0.1:8000/v4/listen")
    load.add_argument("--streams", type=int, default=10, help="concurrent streams")
    load.add_argument("--duration", type=float, default=20.0, help="seconds of audio per stream")
    load.add_argument("--codec", default="opus")
    load.add_argument("--sample-rate", type=int, default=None, help="default: the codec's usual rate")
    load.add_argument("--file", type=Path, default=None, help="WAV recording to loop (default: synthetic speech-like noise)")
    load.add_argument("--language", default="en")
    load.add_argument("--stt-service", default="null",
                      help="null (the server needs --null-provider) measures the gateway alone; '' = the server's chain")
    load.add_argument("--ramp", type=float, default=None, help="seconds over which the streams connect")
    load.add_argument("--idle", action="store_true", help="connect and hold without audio (memory per connection)")
    load.add_argument("--token", default=os.environ.get("HARKEN_TOKEN"),
                      help="one bearer token for every stream (default: $HARKEN_TOKEN, or one minted locally per stream)")
    load.add_argument("--data-dir", type=Path, default=None, help="server data folder (to mint local tokens)")
    load.add_argument("--speech-dir", type=Path, default=None,
                      help="real speech through the server's engine: WAVs listed in DIR/transcripts.tsv (file, "
                           "reference), read with pauses; reports per-utterance latency and WER (harken/loadspeech.py)")
    load.add_argument("--utterances", type=int, default=6, help="with --speech-dir: recordings each stream reads")
    load.add_argument("--pause", type=float, default=4.0, help="with --speech-dir: seconds of silence after each")
    load.add_argument("--target-p95", type=float, default=None,
                      help="with --speech-dir: find the most speaking streams that hold this final-latency p95 (s)")
    load.set_defaults(run=_cmd_loadtest)
    return parser


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "Path": Path}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default: {f.default})")


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in setting_fields()}
    return Settings.from_env(**overrides)


def configure_logging(level: str, log_format: str = "text") -> None:
    from .logs import configure_logging as configure

    configure(level, log_format)


# -- serve ----------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    from .server import run_server

    return run_server(settings)


# -- token ----------------------------------------------------------------------------------
def _cmd_token(args: argparse.Namespace) -> int:
    from .gateway.auth import mint_local_token

    settings = Settings.from_env(data_dir=args.data_dir)
    print(mint_local_token(settings, args.uid, args.ttl))
    return 0


# -- stream ---------------------------------------------------------------------------------
def _cmd_stream(args: argparse.Namespace) -> int:
    from .client import device_messages, listen_url, local_token_minter, read_wav_16k, stream_messages

    import numpy as np

    pcm = read_wav_16k(args.file)
    pcm = np.concatenate([pcm, np.zeros(int(args.tail * 16000), dtype=np.int16)])
    from .codecs import default_rate

    rate = args.sample_rate or default_rate(args.codec)
    messages, seconds = device_messages(pcm, args.codec, rate)
    token = args.token
    if token is None:
        mint = local_token_minter(args.url, args.data_dir)
        token = mint(args.uid) if mint else None
    url = listen_url(args.url, codec=args.codec, sample_rate=rate, language=args.language,
                     uid=args.uid if token is None else None)
    view = LiveView(sys.stdout, realtime=args.realtime)
    result = asyncio.run(stream_messages(url, messages, seconds, token=token, realtime=args.realtime,
                                         settle_seconds=args.settle, on_update=view.update, on_event=view.event))
    view.finish(result)
    return 0 if result.close_code in (1000, 1001, None) else 1


def _cmd_sync(args: argparse.Namespace) -> int:
    from .sync_client import default_token, sync_files

    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"harken sync: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    token = args.token or default_token(args.url, args.uid, args.data_dir)
    return sync_files(list(args.files), url=args.url, token=token, at=args.at, wait=args.wait)


def _cmd_receive_audio(args: argparse.Namespace) -> int:
    from .receiver import run

    configure_logging("info")
    print(f"writing audio-bytes webhooks to {args.dir.resolve()}; point the webhook at "
          f"http://{args.host}:{args.port}/audio", file=sys.stderr)
    run(args.dir, args.host, args.port, secret=args.secret)
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from .loadtest import load_test_main

    return load_test_main(args)


class LiveView:
    """Shows a stream as it goes: segments, then a status line (provider, latency, audio sent).

    On a terminal the segments are rewritten in place as they grow and the status line stays
    under them; otherwise (a pipe, a log) each segment version is printed once as it arrives and
    the status comes at the end, so the output stays readable as a file.
    """

    def __init__(self, out, *, realtime: bool = True):
        self.out = out
        self.tty = out.isatty()
        self.realtime = realtime        # latency means something only at real-time pace
        self.lines_drawn = 0
        self.status = "connecting"

    def update(self, result, segment) -> None:
        if not self.tty:
            self.out.write(f"{_format(segment)}\n")
            self.out.flush()
            return
        self._redraw(result)

    def event(self, result, event: dict) -> None:
        if event.get("type") == "service_status":
            self.status = str(event.get("status"))
            # ready names its provider too; the status line's first part already shows it
            if event.get("provider") and event.get("status") != "ready":
                self.status += f" ({event['provider']})"
        if self.tty:
            self._redraw(result)

    def _redraw(self, result) -> None:
        if self.lines_drawn:
            self.out.write(f"\x1b[{self.lines_drawn}F\x1b[J")
        lines = [_format(s) for s in result.ordered()]
        lines.append(f"\x1b[2m── {self.status_line(result)}\x1b[0m")
        self.out.write("\n".join(lines) + "\n")
        self.lines_drawn = len(lines)
        self.out.flush()

    def status_line(self, result) -> str:
        """``provider · latency · segments · status``, from what the client has seen so far."""
        parts = [" → ".join(result.providers()) or "no words yet"]
        latencies = result.latencies() if self.realtime else []
        if latencies:
            parts.append(f"latency {latencies[-1]:.1f} s (p50 {_median(latencies):.1f} s)")
        parts.append(f"{len(result.segments)} segments")
        parts.append(self.status)
        return " · ".join(parts)

    def finish(self, result) -> None:
        if not self.tty:
            self.out.write(f"-- {self.status_line(result)}\n")
        if result.close_code not in (1000, None):
            self.out.write(f"closed {result.close_code} {result.close_reason}\n")
        for event in result.events:
            if event.get("type") == "error":
                self.out.write(f"error: {event.get('message')}\n")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _format(segment: dict) -> str:
    who = "you" if segment.get("is_user") else segment.get("speaker", "?")
    return f"[{segment['start']:7.2f}-{segment['end']:7.2f}] {who}: {segment['text']}"
