"""`bagel-serve`: checkpoint tools, the in-process workflows, the demo (the project's main job), the servers,
and `submit` / `jobs`: the job API of a running gateway through `bagel_serve.client`.

Model code and torch are imported by the commands that need them, not here: `bagel-serve gateway` and
`bagel-serve worker` start as slim processes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from services.common.config import PRESETS
from services.common.contracts import (ANSWER_TOKENS, THINK_TOKENS, Cancelled, Controls, ImageParams, InputError,
                                       Progress, TextParams)
from services.common.images import load_image
from services.common.secrets import WeakSecret

# Bad images and checkpoints are InputErrors too (ImageError, CheckpointError); WeakSecret: a placeholder
# or too short token or S3 secret at a process's start.
USER_ERRORS = (InputError, FileNotFoundError, WeakSecret)
# The attention registry's names (services/attention/registry.py imports torch; a test keeps the two equal),
# so that building the parser loads no model code.
ATTENTION_BACKENDS = ("sdpa", "triton")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


def _progress_controls() -> tuple[Controls, callable]:
    """A tqdm bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return Controls(), lambda: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on_progress(p: Progress) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            bar = bars[p.stage] = tqdm(total=p.total, desc=p.stage, unit="step" if p.stage == "denoise" else "tok",
                                       leave=False)
        bar.update(p.step - bar.n)

    return Controls(on_progress=on_progress), lambda: [b.close() for b in bars.values()]


def _checkpoint_dir(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from services.dev.default_model import default_checkpoint_dir

    return default_checkpoint_dir()


def _clients(args):
    from services.orchestrator.local import local_clients

    return local_clients(_checkpoint_dir(args), device=args.device, attention=args.attention)


def _image_params(args, base: ImageParams) -> ImageParams:
    overrides = {k: v for k, v in {
        "num_timesteps": args.steps, "seed": args.seed, "cfg_text_scale": args.cfg_text_scale,
        "cfg_img_scale": args.cfg_img_scale, "timestep_shift": args.timestep_shift,
        "cfg_renorm_type": args.cfg_renorm_type, "cfg_renorm_min": args.cfg_renorm_min,
        "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None,
    }.items() if v is not None}
    return ImageParams(**{**base.__dict__, **overrides})


def cmd_checkpoint_init(args) -> int:
    from services.dev.random_checkpoint import init_checkpoint

    out = init_checkpoint(args.preset, args.out, seed=args.seed)
    print(json.dumps({"checkpoint": str(out), "preset": args.preset, "seed": args.seed}))
    return 0


def cmd_checkpoint_inspect(args) -> int:
    from services.common.checkpoint import Checkpoint

    cfg = Checkpoint(args.dir).config
    print(json.dumps({"llm": cfg.llm.__dict__, "vit": cfg.vit.__dict__, "ae": cfg.ae.__dict__,
                      "max_latent_size": cfg.max_latent_size,
                      "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side}, indent=2))
    return 0


def cmd_understand(args) -> int:
    from services.orchestrator import workflows as wf

    image = load_image(args.image)
    controls, close = _progress_controls()
    params = TextParams(max_new_tokens=args.max_new_tokens or (THINK_TOKENS if args.think else ANSWER_TOKENS),
                        do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        res = wf.understand(_clients(args), image, args.prompt, params, think=args.think, controls=controls)
    finally:
        close()
    print(json.dumps({"answer": res.text, "think": res.think, "tokens": res.tokens}, ensure_ascii=False))
    return 0


def cmd_generate(args) -> int:
    from services.orchestrator import workflows as wf

    w, h = args.size
    controls, close = _progress_controls()
    try:
        out = wf.generate(_clients(args), args.prompt, _image_params(args, ImageParams(width=w, height=h)),
                          think=args.think, controls=controls)
    finally:
        close()
    out.to_pil().save(args.out)
    print(json.dumps({"out": args.out, "seed": out.seed, "size": [w, h], "think": out.think}, ensure_ascii=False))
    return 0


def cmd_edit(args) -> int:
    from services.orchestrator import workflows as wf

    image = load_image(args.image)
    controls, close = _progress_controls()
    try:
        out = wf.edit(_clients(args), image, args.prompt, _image_params(args, wf.edit_params(image)),
                      think=args.think, controls=controls)
    finally:
        close()
    out.to_pil().save(args.out)
    print(json.dumps({"out": args.out, "seed": out.seed, "size": list(out.to_pil().size), "think": out.think},
                     ensure_ascii=False))
    return 0


def cmd_demo(args) -> int:
    """The main job: every workflow once on the embedded default model, outputs written to --out. By
    default through the whole local stack (Redis, S3, model servers, Celery worker, gateway)."""
    if not args.in_process:
        import tempfile

        from services.orchestrator.demo import run_demo

        with tempfile.TemporaryDirectory(prefix="bagel-stack-") as workdir:
            report = run_demo(Path(args.out), Path(workdir), args.checkpoint, args.device)
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0

    from services.orchestrator import workflows as wf
    from services.orchestrator.demo import demo_picture

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = _clients(args)
    image = demo_picture()
    image.save(out_dir / "input.png")
    report = {}
    t = time.perf_counter()
    und = wf.understand(clients, image, "What is in this picture?", TextParams(max_new_tokens=16))
    report["understand"] = {"answer": und.text, "tokens": und.tokens, "seconds": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    gen = wf.generate(clients, "a red square on a blue sky", ImageParams(width=256, height=256, num_timesteps=12,
                                                                         seed=42))
    gen.to_pil().save(out_dir / "generate.png")
    report["generate"] = {"out": str(out_dir / "generate.png"), "seed": gen.seed,
                          "seconds": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    ed = wf.edit(clients, image, "make the square green", wf.edit_params(image, num_timesteps=8, seed=7))
    ed.to_pil().save(out_dir / "edit.png")
    report["edit"] = {"out": str(out_dir / "edit.png"), "seed": ed.seed, "size": list(ed.to_pil().size),
                      "seconds": round(time.perf_counter() - t, 2)}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_worker(args) -> int:
    """A Celery worker of the orchestrator (configuration from the environment: settings.py)."""
    from services.common.rpc.logs import configure_logging

    configure_logging(args.log_level)
    from services.common.secrets import check_startup
    from services.common.storage import StorageConfig
    from services.orchestrator.settings import CONTROL_QUEUE, QUEUE, OrchestratorSettings

    # Before the Celery app connects to anything. The worker only presents the token (to the model
    # servers), so the length rule is theirs; a placeholder is refused here all the same.
    storage = StorageConfig.from_env()
    check_startup("the worker", token=OrchestratorSettings.from_env().auth_token, token_name="BAGEL_AUTH_TOKEN",
                  s3_secret=storage.secret_key if storage else None)
    from services.orchestrator.celery_app import app

    app.bagel_runtime.metrics.serve(args.metrics_port, args.host)

    # Threads: a job mostly waits on gRPC calls to the model servers, so a process runs several.
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(args.concurrency), "--queues", f"{QUEUE},{CONTROL_QUEUE}",
                     "--loglevel", args.log_level, "--hostname", args.hostname, "--without-gossip",
                     "--without-mingle"])
    return 0


def cmd_stack(args) -> int:
    """Run the local stack until interrupted, printing how to reach it."""
    import signal
    import tempfile

    from services.orchestrator.stack import LocalStack

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bagel-stack-"))
    with LocalStack(workdir, checkpoint=args.checkpoint, device=args.device,
                    worker_concurrency=args.worker_concurrency, auth_token=args.auth_token) as stack:
        # The token is printed so that the person who started the stack can call it (BAGEL_TOKEN=...).
        print(json.dumps({"http": stack.http_url, "grpc": stack.grpc_address, "token": stack.auth_token,
                          "redis": stack.redis.url, "s3": stack.s3.endpoint, "logs": str(workdir / "logs")},
                         indent=2), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            # The stack restarts what exits (logging why); only a process it gave up on ends the command.
            while not stack.gave_up:
                time.sleep(1)
            for name, why in stack.gave_up.items():
                print(f"{name} {why}: the stack gave up on it; see {workdir / 'logs' / (name + '.log')}",
                      file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


# ---- against a running gateway (bagel_serve.client) ------------------------------------------------------
REMOTE_EXIT_CODES = "exit codes: 0 done, 2 bad input (refused request, unknown job, missing file), 130 cancelled, 1 other failure"


def _remote_client(args):
    from bagel_serve.client import Client

    return Client(args.url, token=args.token or None, timeout=args.timeout)


def _job_dict(job) -> dict:
    """The Job as the HTTP API writes it, less an inline PNG (the image goes to --out)."""
    from google.protobuf import json_format

    msg = type(job.proto)()
    msg.CopyFrom(job.proto)
    msg.result.ClearField("image_png")
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class _Report:
    """How a remote command shows a job: a tqdm bar (denoising) and the text as it is written on a terminal,
    JSON lines otherwise (one per event, then the final job)."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.bar = None
        self.text_len = 0
        self.stage = ""

    def event(self, p) -> None:
        if not self.tty:
            print(json.dumps({"event": "progress", "id": p.job_id, "state": p.state.value, "stage": p.stage,
                              "step": p.step, "total": p.total, "text": p.text}, ensure_ascii=False), flush=True)
            return
        if p.stage != self.stage:
            self._close_bar()
            self.stage, self.text_len = p.stage, 0
            if p.stage in ("think", "answer"):
                print(f"[{p.stage}] ", end="", file=sys.stderr, flush=True)
        if p.stage == "denoise" and p.total:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=p.total, desc="denoise", unit="step", leave=False)
            self.bar.update(p.step - self.bar.n)
        elif p.stage in ("think", "answer") and len(p.text) > self.text_len:
            print(p.text[self.text_len:], end="", file=sys.stderr, flush=True)  # only what is new
            self.text_len = len(p.text)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.stage in ("think", "answer"):
            print(file=sys.stderr)

    def final(self, job, out: str | None = None) -> None:
        self._close_bar()
        self.stage = ""
        d = _job_dict(job)
        if not self.tty:
            print(json.dumps({"event": "job", "job": d, **({"out": out} if out else {})}, ensure_ascii=False),
                  flush=True)
            return
        r = d.get("result", {})
        if job.state.value == "SUCCEEDED" and job.workflow == "understand":
            print(r.get("text", ""))
        elif job.state.value == "SUCCEEDED" and out:
            print(f"{job.id}: wrote {out} ({r.get('width')}x{r.get('height')}, seed {r.get('seed')})")
        else:
            print(json.dumps(d, indent=2, ensure_ascii=False))


def _exit_code(job) -> int:
    """A finished job's exit code, its error on stderr."""
    if job.state.value == "SUCCEEDED":
        return 0
    print(f"{job.state.value.lower()}: {job.error_code}: {job.error_message}", file=sys.stderr)
    if job.state.value == "CANCELLED":
        return 130
    return 2 if job.error_code == "INVALID_ARGUMENT" else 1


def _follow(client, job, args, report: _Report, owned: bool) -> int:
    """Watch (or just wait for) a job to its end, write --out, report. Ctrl-C cancels a job this command
    submitted (it is the owner), and leaves a watched one running."""
    try:
        if args.watch:
            for p in client.watch(job.id):
                report.event(p)
        final = client.wait(job.id)
    except KeyboardInterrupt:
        if owned:
            client.cancel(job.id)
        raise
    out = None
    if final.state.value == "SUCCEEDED" and args.out and final.workflow != "understand":
        client.result(job.id).image.save(args.out)
        out = args.out
    report.final(final, out)
    return _exit_code(final)


def cmd_submit(args) -> int:
    from bagel_serve.client.types import Workflow, build_request

    options = {k: v for k, v in {
        "think": args.think, "session": args.session, "session_ttl_s": args.session_ttl,
        "idempotency_key": args.idempotency_key, "deadline_s": args.deadline, "seed": args.seed,
    }.items() if v is not None}
    if args.workflow == "understand":
        options.update({k: v for k, v in {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample or None,
                                           "temperature": args.temperature, "top_p": args.top_p}.items()
                        if v is not None})
    else:
        options.update({k: v for k, v in {
            "steps": args.steps, "cfg_text_scale": args.cfg_text_scale, "cfg_img_scale": args.cfg_img_scale,
            "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None,
            "cfg_renorm_type": args.cfg_renorm_type, "cfg_renorm_min": args.cfg_renorm_min,
            "timestep_shift": args.timestep_shift}.items() if v is not None})
        if args.workflow == "generate" and args.size:
            options["width"], options["height"] = args.size
    if args.workflow == "edit" and not args.image:
        raise InputError("edit needs --image")
    request = build_request(Workflow(args.workflow), args.prompt, image=args.image, **options)
    report = _Report()
    with _remote_client(args) as client:
        job = client.submit(request)
        if not (args.watch or args.wait or args.out):
            report.final(job)  # accepted: the job id to follow later with `jobs watch`
            return 0
        return _follow(client, job, args, report, owned=True)


def cmd_jobs(args) -> int:
    report = _Report()
    with _remote_client(args) as client:
        if args.action == "get":
            report.final(client.get(args.id))
            return 0
        if args.action == "cancel":
            report.final(client.cancel(args.id))
            return 0
        args.watch = True
        return _follow(client, client.get(args.id), args, report, owned=False)


def add_remote_commands(sub) -> None:
    def connection(sp):
        sp.add_argument("--url", default=os.environ.get("BAGEL_URL") or "http://127.0.0.1:8080",
                        help="the gateway: http(s)://host:port, or grpc(s)://host:port for gRPC "
                             "(default: $BAGEL_URL, else http://127.0.0.1:8080)")
        sp.add_argument("--token", default=os.environ.get("BAGEL_TOKEN"), help="bearer token (default: $BAGEL_TOKEN)")
        sp.add_argument("--timeout", type=float, default=60.0, help="seconds for each call to the gateway")

    def following(sp):
        sp.add_argument("--watch", action="store_true", help="show progress until the job ends")
        sp.add_argument("--out", help="write the output image here (waits for the job)")

    how = ("On a terminal: progress bars and the text as it is written; otherwise JSON lines (one per event, "
           "then the final job). " + REMOTE_EXIT_CODES + ".")
    sm = sub.add_parser("submit", help="submit a job to a running gateway", description=how
                        ).add_subparsers(dest="workflow", required=True)
    for name, text in (("understand", "answer a question about an image"), ("generate", "text to image"),
                       ("edit", "edit an image following a prompt")):
        sp = sm.add_parser(name, help=text, description=f"{text}, on a running gateway. {how} Without --watch, "
                                                        "--wait or --out it prints the accepted job and returns.")
        connection(sp)
        following(sp)
        sp.add_argument("--wait", action="store_true", help="wait for the end without showing progress")
        sp.add_argument("--image", required=name == "edit",
                        help="input image file" + (" (leave out for a follow-up in --session)"
                                                   if name == "understand" else ""))
        sp.add_argument("--prompt", required=True)
        sp.add_argument("--think", action="store_true", help="think before answering / generating")
        sp.add_argument("--seed", type=int)
        sp.add_argument("--session", help="continue this conversation (created on first use)")
        sp.add_argument("--session-ttl", type=int, help="seconds an idle session is kept")
        sp.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
        sp.add_argument("--deadline", type=float, help="fail the job (DEADLINE_EXCEEDED) if not done in S seconds")
        if name == "understand":
            sp.add_argument("--max-new-tokens", type=int)
            sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
            sp.add_argument("--temperature", type=float)
            sp.add_argument("--top-p", type=float)
        else:
            if name == "generate":
                sp.add_argument("--size", type=_size, help="WxH, multiples of 16, at most 1024 (default 1024x1024)")
            _denoise_options(sp)
        sp.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="look at, follow or cancel a job on a running gateway", description=how
                        ).add_subparsers(dest="action", required=True)
    for name, text in (("get", "print the job"), ("watch", "follow the job to its end"),
                       ("cancel", "ask the job to stop")):
        sp = jb.add_parser(name, help=text, description=f"{text}. {how}")
        connection(sp)
        sp.add_argument("id", help="the job id")
        if name == "watch":
            sp.add_argument("--out", help="write the output image here once the job has succeeded")
        sp.set_defaults(func=cmd_jobs, watch=False, out=None)


def _denoise_options(sp: argparse.ArgumentParser) -> None:
    """The image options `run` (in-process) and `submit` (a running gateway) share."""
    sp.add_argument("--steps", type=int, help="number of timesteps (N timesteps = N-1 model steps)")
    sp.add_argument("--cfg-text-scale", type=float)
    sp.add_argument("--cfg-img-scale", type=float)
    sp.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"))
    sp.add_argument("--cfg-renorm-type", choices=["global", "channel", "text_channel"])
    sp.add_argument("--cfg-renorm-min", type=float)
    sp.add_argument("--timestep-shift", type=float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagel-serve", description="Serve BAGEL-style unified multimodal models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="action", required=True)
    init = ck.add_parser("init", help="write a randomly initialised checkpoint in the official layout")
    init.add_argument("--preset", choices=sorted(PRESETS), required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_checkpoint_init)
    insp = ck.add_parser("inspect", help="print the sizes read from a checkpoint directory")
    insp.add_argument("dir")
    insp.set_defaults(func=cmd_checkpoint_inspect)

    def common(sp):
        sp.add_argument("--checkpoint", help="checkpoint directory (default: the embedded tiny model)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--attention", choices=ATTENTION_BACKENDS,
                        help="attention backend (default: triton on CUDA, sdpa elsewhere; BAGEL_ATTENTION_BACKEND "
                             "overrides the default)")
        sp.add_argument("--think", action="store_true", help="think before answering / generating")
        sp.add_argument("--seed", type=int)

    def image_opts(sp):
        sp.add_argument("--out", required=True, help="output PNG path")
        _denoise_options(sp)

    run = sub.add_parser("run", help="run one workflow in-process").add_subparsers(dest="workflow", required=True)
    u = run.add_parser("understand", help="answer a question about an image")
    common(u)
    u.add_argument("--image", required=True)
    u.add_argument("--prompt", required=True)
    u.add_argument("--max-new-tokens", type=int)
    u.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    u.add_argument("--temperature", type=float, default=0.3)
    u.add_argument("--top-p", type=float, default=1.0)
    u.set_defaults(func=cmd_understand)
    g = run.add_parser("generate", help="text to image")
    common(g)
    image_opts(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--size", type=_size, default=(1024, 1024), help="WxH, multiples of 16, at most 1024")
    g.set_defaults(func=cmd_generate)
    e = run.add_parser("edit", help="edit an image following a prompt")
    common(e)
    image_opts(e)
    e.add_argument("--image", required=True)
    e.add_argument("--prompt", required=True)
    e.set_defaults(func=cmd_edit)

    from services.serve import add_serve_arguments, serve_from_args

    sv = sub.add_parser("serve", help="run a model server (vit, vae or llm) over gRPC")
    add_serve_arguments(sv)
    sv.set_defaults(func=serve_from_args)

    d = sub.add_parser("demo", help="run every workflow once on the embedded default model, through the local stack")
    d.add_argument("--out", default="demo-output")
    d.add_argument("--checkpoint")
    d.add_argument("--device", default="cpu")
    d.add_argument("--attention", choices=ATTENTION_BACKENDS, help="attention backend (with --in-process)")
    d.add_argument("--in-process", action="store_true", help="run the engines in this process, no services")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("worker", help="run a Celery worker of the orchestrator (config: BAGEL_* environment)")
    w.add_argument("--concurrency", type=int, default=4, help="jobs run at once (threads)")
    w.add_argument("--hostname", default="celery@%h", help="the worker's node name")
    w.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 disables")
    w.add_argument("--host", default="127.0.0.1",
                   help="address the metrics port binds (default: 127.0.0.1; 0.0.0.0 in a container)")
    w.add_argument("--log-level", default="INFO")
    w.set_defaults(func=cmd_worker)

    from services.orchestrator.gateway import add_gateway_arguments, gateway_from_args

    gw = sub.add_parser("gateway", help="run the job API (gRPC JobService + HTTP/JSON)")
    add_gateway_arguments(gw)
    gw.set_defaults(func=gateway_from_args)

    st = sub.add_parser("stack", help="run Redis, S3, the model servers, a worker and the gateway locally")
    st.add_argument("--workdir", help="data and logs (default: a new temporary folder)")
    st.add_argument("--checkpoint", help="default: the embedded tiny model")
    st.add_argument("--device", default="cpu")
    st.add_argument("--worker-concurrency", type=int, default=2)
    st.add_argument("--auth-token", default=os.environ.get("BAGEL_AUTH_TOKEN"),
                    help="the gateway's and model servers' bearer token (default: $BAGEL_AUTH_TOKEN, else a "
                         "random one, printed)")
    st.set_defaults(func=cmd_stack)

    add_remote_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The client's errors (from `submit` / `jobs`): a refused request or an unknown job is bad input.
    from bagel_serve.client import BagelError, Cancelled as JobCancelled, InvalidArgument, NotFound as NoSuchJob

    try:
        return args.func(args)
    except USER_ERRORS + (InvalidArgument, NoSuchJob) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, JobCancelled) as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except BagelError as e:  # the gateway refused otherwise, or could not be reached
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
