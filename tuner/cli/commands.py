"""Command line: argument parsing and exit codes. Heavy ML libraries are imported lazily."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path

from tuner import __version__
from tuner.errors import EXIT_INTERNAL, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError, UserErrors
from tuner.observe import events, termination


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuner",
        description="Fine-tune a preset base model with LoRA/QLoRA from a Kaito Workspace tuning spec "
                    "and publish the adapter as an OCI image.")
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def registry_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                         help="reach this registry over plain HTTP (repeatable); all others use verified HTTPS")
        sub.add_argument("--registry-ca", type=Path, metavar="CA.pem",
                         help="CA bundle to verify registries' HTTPS certificates with")
        sub.add_argument("--registry-config", type=Path, metavar="PATH",
                         help="docker config.json (or its directory) holding the registry credentials "
                              "(default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json)")

    def log_format_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--log-format", choices=events.FORMATS,
                         help="text lines (default) or one JSON event per line (default from $TUNER_LOG_FORMAT)")

    def merged_image_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--merged-image", metavar="REF",
                         help="also push the base model with the adapter merged (no peft needed to serve it) as "
                              "a second image: REGISTRY/REPO:TAG, or oci:DIR[:TAG] for a local run")

    def render_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("workspace", type=Path, help="Workspace YAML with a tuning section")
        sub.add_argument("--config", type=Path, help="training ConfigMap manifest, or a bare training_config.yaml")
        sub.add_argument("--namespace", "-n", help="namespace of the Job (default: the Workspace's "
                                                   "metadata.namespace, else default)")
        sub.add_argument("--image", help="the tuner image the Job runs (default: the release's image)")
        sub.add_argument("--no-resume", action="store_true",
                         help="work volume as an emptyDir: a retried pod starts over instead of resuming")
        sub.add_argument("--work-pvc", metavar="CLAIM", help="use this existing PVC as the work volume")
        sub.add_argument("--storage-class", help="storage class of the work PVC tuner creates")
        sub.add_argument("--storage-size", default="100Gi", help="size of the work PVC tuner creates (default 100Gi)")
        sub.add_argument("--gpus", type=int, metavar="N", help="GPUs per node, for an instance type tuner does not know")
        sub.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory per GPU in GiB, likewise")
        sub.add_argument("--backoff-limit", type=int, default=3, help="retries after failures (default 3)")
        sub.add_argument("--model-cache-pvc", metavar="CLAIM",
                         help="a ReadWriteMany claim shared by jobs as the model cache: the first job fills it, "
                              "later ones read it")
        sub.add_argument("--url-headers-secret", metavar="SECRET",
                         help="Secret whose key headers.json holds HTTP headers per dataset host "
                              '({"host": {"Authorization": "..."}}), mounted for the fetch container')
        sub.add_argument("--env-secret", action="append", default=[], metavar="SECRET",
                         help="a Secret whose keys become the training container's environment, e.g. "
                              "MLFLOW_TRACKING_URI or WANDB_API_KEY for TrainingArguments.report_to (repeatable)")
        sub.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                         help="let the Job push to this registry over plain HTTP (repeatable)")
        sub.add_argument("--log-format", choices=events.FORMATS, default="text", dest="job_log_format",
                         help="the Job's log lines: text (default) or one JSON event per line")
        merged_image_argument(sub)
        sub.add_argument("--metrics-port", type=_port, metavar="PORT",
                         help="the Job serves Prometheus metrics on this port (`tuner run --metrics-port`), "
                              "named `metrics` and annotated prometheus.io/scrape")

    def job_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("workspace", type=Path, help="Workspace YAML with a tuning section")
        sub.add_argument("--config", type=Path, help="training ConfigMap manifest, or a bare training_config.yaml")
        sub.add_argument("--output", metavar="REF",
                         help="override tuning.output: REGISTRY/REPO:TAG, or oci:DIR[:TAG] for an OCI image layout")
        sub.add_argument("--allow-private-urls", action="store_true",
                         help="allow dataset URLs on localhost or private networks (local testing)")
        registry_arguments(sub)
        merged_image_argument(sub)

    run = commands.add_parser("run", help="run the whole tuning job here: fetch, prepare, train, package")
    job_arguments(run)
    run.add_argument("--work-dir", type=Path, help="where inputs, checkpoints and the adapter go "
                                                   "(default: ./tuner-work/<workspace name>)")
    run.add_argument("--skip-fetch", action="store_true",
                     help="use the inputs `tuner fetch` left in the work directory instead of fetching them")
    log_format_argument(run)
    run.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="serve the job's Prometheus metrics (loss, step, tokens/s, stage, ...) on this port "
                          "while it runs (rank 0 under torchrun)")
    run.add_argument("--restart", action="store_true",
                     help="delete the work directory's checkpoints (and ignore a finished adapter) and train "
                          "from the start; without it a run resumes from the latest checkpoint of the same job")
    fetch = commands.add_parser("fetch", help="only fetch the inputs into WORKDIR/inputs (the Job's init container)")
    fetch.add_argument("workspace", type=Path, help="Workspace YAML with a tuning section")
    fetch.add_argument("--work-dir", type=Path, help="the work directory `tuner run` will use "
                                                     "(default: ./tuner-work/<workspace name>)")
    fetch.add_argument("--allow-private-urls", action="store_true",
                       help="allow dataset URLs on localhost or private networks (local testing)")
    registry_arguments(fetch)
    log_format_argument(fetch)
    validate = commands.add_parser("validate", help="check a Workspace and training config without running")
    job_arguments(validate)
    commands.add_parser("presets", help="list the base-model presets and the GPU each method needs")
    plan = commands.add_parser("plan", help="size a job before booking GPUs: memory per GPU, batch, steps, duration")
    plan.add_argument("workspace", type=Path, help="Workspace YAML with a tuning section")
    plan.add_argument("--config", type=Path, help="training ConfigMap manifest, or a bare training_config.yaml")
    plan.add_argument("--gpus", type=int, metavar="N", help="GPUs per node, for an instance type tuner does not know")
    plan.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory per GPU in GiB, likewise")
    plan.add_argument("--allow-private-urls", action="store_true", help="count data on localhost or private networks")
    check = commands.add_parser("check-data", help="report what preparation would do to dataset files, "
                                                   "without training")
    check.add_argument("files", type=Path, nargs="+", help="dataset files or folders")
    check.add_argument("--preset", default="smollm2-135m-instruct", help="whose tokenizer and chat template to use")
    check.add_argument("--tokenizer", type=Path, help="a tokenizer folder to use instead of the preset's model")
    check.add_argument("--config", type=Path, help="training ConfigMap: its DatasetConfig and max_length apply")
    check.add_argument("--max-length", type=int, help="override TrainingArguments.max_length")
    render = commands.add_parser("render", help="print the ConfigMap, Job (and Service, PVC) for a Workspace")
    render_arguments(render)
    render.add_argument("--pod-monitor", action="store_true",
                        help="also print a prometheus-operator PodMonitor scraping the Job's --metrics-port")

    def cluster_arguments(sub: argparse.ArgumentParser, namespace: bool = True) -> None:
        sub.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                                                         "else the in-cluster service account)")
        sub.add_argument("--context", help="kubeconfig context to use")
        if namespace:
            sub.add_argument("--namespace", "-n", default="default", help="namespace of the Job (default: default)")

    submit = commands.add_parser("submit", help="create the tuning Job in the cluster (same spec again: no-op)")
    render_arguments(submit)
    cluster_arguments(submit, namespace=False)
    submit.add_argument("--replace", action="store_true", help="replace an existing Job whose spec differs")
    for verb, text in (("status", "phase, conditions, retries and latest progress of a tuning Job"),
                       ("logs", "the fetch and tuner logs of a tuning Job's pods, oldest first"),
                       ("cancel", "delete a tuning Job (its pods and work PVC go with it)")):
        sub = commands.add_parser(verb, help=text)
        sub.add_argument("name", metavar="WORKSPACE", help="the Workspace's metadata.name")
        cluster_arguments(sub)
        if verb == "logs":
            sub.add_argument("--follow", "-f", action="store_true", help="stream the current pod's log")
    push = commands.add_parser("push", help="package a finished work directory's adapter and push it to a registry")
    push.add_argument("work_dir", type=Path, metavar="WORKDIR", help="work directory of `tuner run`, or an adapter folder")
    push.add_argument("image", metavar="IMAGE", help="REGISTRY/REPO:TAG, or oci:DIR[:TAG]")
    registry_arguments(push)
    merge = commands.add_parser("merge", help="write the base model with the adapter merged into its weights "
                                              "(a plain transformers model folder, no peft)")
    merge.add_argument("work_dir", type=Path, metavar="WORKDIR", help="work directory of `tuner run`, or an adapter folder")
    merge.add_argument("out", type=Path, metavar="OUT", help="new or empty folder for the merged model")
    merge.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                       help="the merged weights' dtype (default: the dtype training ran in, else bf16)")
    merge.add_argument("--base-model", type=Path, metavar="DIR",
                       help="the base model's folder (default: found as training found it)")
    registry_arguments(merge)
    log_format_argument(merge)
    pull = commands.add_parser("pull", help="download an adapter image and unpack its /data files")
    pull.add_argument("image", metavar="IMAGE", help="REGISTRY/REPO[:TAG][@DIGEST]")
    pull.add_argument("dest", type=Path, metavar="DIR", help="new or empty directory for the adapter files")
    registry_arguments(pull)
    report = commands.add_parser("report", help="draw a work directory's logged metrics (loss curves) as a PNG")
    report.add_argument("work_dir", type=Path, metavar="WORKDIR", help="work directory of `tuner run`")
    report.add_argument("--metric", action="append", metavar="NAME",
                        help="a logged metric to draw (repeatable; default: loss and eval_loss), e.g. "
                             "learning_rate, grad_norm, tokens_per_second")
    report.add_argument("--out", type=Path, metavar="PNG", help="where to write it (default: WORKDIR/loss_curve.png)")
    chat = commands.add_parser("chat", help="answer a prompt with a preset's base model plus an adapter")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--preset", default="smollm2-135m-instruct", help="base model preset")
    chat.add_argument("--adapter", type=Path, help="adapter folder (e.g. from `tuner pull`); omit for the base model")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit (default 128)")
    return parser


def _render(args: argparse.Namespace):
    from tuner.kube.render import DEFAULT_IMAGE, RenderOptions, render
    from tuner.spec.plan import plan_job

    plan = plan_job(args.workspace, config_path=args.config, for_cluster=True, merged_image=args.merged_image)
    return render(plan, RenderOptions(
        namespace=args.namespace, image=args.image or DEFAULT_IMAGE, resume=not args.no_resume,
        work_pvc=args.work_pvc, storage_class=args.storage_class, storage_size=args.storage_size, gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory, backoff_limit=args.backoff_limit,
        insecure_registries=tuple(args.insecure_registry), url_headers_secret=args.url_headers_secret,
        env_secrets=tuple(args.env_secret), model_cache_pvc=args.model_cache_pvc,
        log_format=args.job_log_format, metrics_port=args.metrics_port,
        pod_monitor=getattr(args, "pod_monitor", False)))


def _cluster(args: argparse.Namespace) -> int:
    from tuner.kube import submit
    from tuner.kube.api import load_client

    if args.command == "submit":
        rendered = _render(args)
        with load_client(args.kubeconfig, args.context) as api:
            result = submit.submit(api, rendered.manifests, rendered.namespace, replace=args.replace)
        for note in rendered.notes:
            events.info(note)
        for verb, items in (("created", result.created), ("replaced", result.replaced),
                            ("unchanged", result.unchanged)):
            for item in items:
                print(f"{verb}: {item}")
        name = result.job.removesuffix("-tuning")
        namespace = rendered.namespace
        print(f"job {namespace}/{result.job}: watch it with `tuner status {name} -n {namespace}` "
              f"or `tuner logs -f {name} -n {namespace}`")
        return EXIT_OK
    with load_client(args.kubeconfig, args.context) as api:
        return _watch(api, args)


def _watch(api, args: argparse.Namespace) -> int:
    """`tuner status/logs/cancel WORKSPACE`: the Job is `<WORKSPACE>-tuning`."""
    from tuner.kube import submit, watch

    job = f"{args.name}-tuning"
    if args.command == "status":
        state = watch.status(api, job, args.namespace)
        conditions = ", ".join(f"{c.type}={c.status}" for c in state.conditions) or "none"
        print(f"{args.namespace}/{job}: {state.phase} | conditions: {conditions} | retries: {state.retries} | "
              f"active pods: {state.active}")
        if state.progress:
            print(f"progress: {state.progress}")
        if state.result:
            print(f"result: {state.result}")
        return EXIT_OK
    if args.command == "logs":
        watch.logs(api, job, args.namespace, follow=args.follow)
        return EXIT_OK
    submit.cancel(api, job, args.namespace)
    print(f"cancelled {args.namespace}/{job}")
    return EXIT_OK


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (1 to 65535)")
    return int(value)


def _metrics(args: argparse.Namespace, plan):
    """`tuner run --metrics-port`: rank 0 serves the job's metrics while it runs (tuner.observe.metrics);
    binding the port here makes one in use an error before any work."""
    from tuner.train.distributed import ranks_from_env

    if args.metrics_port is None or not ranks_from_env().is_main:
        return contextlib.nullcontext()
    from tuner.observe import metrics

    return metrics.serving(args.metrics_port, workspace=plan.workspace.metadata.name, preset=plan.preset.name,
                           method=plan.workspace.tuning.method)


def _registry_options(args: argparse.Namespace):
    from tuner.spec.targets import RegistryOptions

    return RegistryOptions(insecure_registries=frozenset(args.insecure_registry), ca_cert=args.registry_ca,
                           config_file=args.registry_config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    events.quiet_libraries()
    try:
        events.configure(getattr(args, "log_format", None))
        return _dispatch(args)
    except UserErrors as exc:  # every problem found in one pass: one line each
        first, *more = exc.errors
        return _failed(EXIT_USER_ERROR, "user_error", str(first), first.where, more=more)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        return _failed(EXIT_USER_ERROR, "user_error", str(exc), exc.where)
    except Preempted as exc:
        events.emit("job.preempted", f"preempted: exit {EXIT_PREEMPTED}; a retry resumes from {exc.checkpoint}",
                    level="warning", step=exc.step, data={"total_steps": exc.total_steps, "checkpoint": exc.checkpoint})
        _terminated(termination.preempted(EXIT_PREEMPTED, exc.step, exc.total_steps, exc.checkpoint))
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        return _failed(130, "interrupted", "interrupted", None)
    except Exception as exc:  # an internal fault: one line unless --debug
        if args.debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _failed(EXIT_INTERNAL, "internal_error", f"internal fault: {type(exc).__name__}: {first} "
                                                        "(rerun with --debug for the traceback)", None)
    finally:
        events.record_to(None)


def _failed(exit_code: int, code: str, message: str, param: str | None, more: list[UserError] = ()) -> int:
    """One `error: ...` line on stderr (a job.failed event in JSON form) and the termination message.

    `more` are further problems found in the same pass: one more line each in text form, the
    event's `data.errors` in JSON form (still one job.failed event).
    """
    error = {"code": code, "message": message, "param": param}
    data = {"errors": [{"code": code, "message": str(e), "param": e.where} for e in more]} if more else None
    events.emit("job.failed", f"error: {message}", level="error", error=error, data=data, stream=sys.stderr,
                stamp=False)
    if more and not events.json_format():
        sys.stderr.write("".join(f"error: {e}\n" for e in more))
        sys.stderr.flush()
    _terminated(termination.failed(exit_code, error))
    return exit_code


def _terminated(outcome: dict) -> None:
    """The pod's termination message, written once per pod (by the node's first process)."""
    from tuner.train.distributed import ranks_from_env

    if ranks_from_env().is_node_leader:
        termination.write(outcome)


def _stop_on_sigterm() -> None:
    """SIGTERM ends the command as an exit, so its scratch folders are removed on the way out."""
    def stop(signum, frame) -> None:
        raise SystemExit(EXIT_PREEMPTED)

    signal.signal(signal.SIGTERM, stop)


def _presets() -> None:
    """`tuner presets`: the catalog, and the smallest known GPU each method needs at the default settings."""
    from tuner.kube.memory_fit import smallest_gpu
    from tuner.spec.plan import effective_max_length
    from tuner.spec.presets import all_presets
    from tuner.spec.training_config import build_config

    print(f"{'PRESET':28} {'PARAMS':>7} {'CONTEXT':>7}  {'LORA (BF16)':24} {'QLORA (NF4)':24} DESCRIPTION")
    for preset in all_presets().values():
        needs = []
        for method in ("lora", "qlora"):
            config = build_config(method)
            need, gpu = smallest_gpu(preset, config, effective_max_length(config, preset))
            needs.append(f"{need.total:5.1f} GiB: {gpu.gpu_model if gpu else 'more than one GPU'}")
        print(f"{preset.name:28} {preset.architecture.parameters / 1e9:6.1f}B {preset.context_length // 1024:6}k  "
              f"{needs[0]:24} {needs[1]:24} {preset.description}")
    print("Any Hugging Face model id (ORG/MODEL) works too: its facts come from its config.json. Sizes are one GPU's "
          "at batch 1 and the default max_length; `tuner plan WORKSPACE` sizes a job.")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("check-data", "pull", "merge"):
        _stop_on_sigterm()
    if args.command == "presets":
        _presets()
        return EXIT_OK
    if args.command == "plan":
        from tuner.cli.plan import plan

        for line in plan(args.workspace, config_path=args.config, gpu_count=args.gpus, gpu_memory_gib=args.gpu_memory,
                         allow_private_urls=args.allow_private_urls):
            print(line)
        return EXIT_OK
    if args.command == "check-data":
        from tuner.cli.check_data import check_data
        from tuner.data.prepare import require_training_rows

        stats = check_data(args.files, preset_name=args.preset, tokenizer_dir=args.tokenizer,
                           config_path=args.config, max_length=args.max_length)
        for line in stats.log_lines():
            print(line)
        sys.stdout.flush()
        require_training_rows(stats)  # the pre-flight check refuses exactly what `tuner run` would
        return EXIT_OK
    if args.command == "render":
        sys.stdout.write(_render(args).to_yaml())
        return EXIT_OK
    if args.command in ("submit", "status", "logs", "cancel"):
        return _cluster(args)
    if args.command == "merge":
        from tuner.train.merge import merge

        merged = merge(args.work_dir, args.out, dtype=args.dtype, base_model=args.base_model,
                       registry=_registry_options(args))
        print(f"{'already merged' if merged.reused else 'merged'}: {merged.folder} ({merged.dtype})")
        return EXIT_OK
    if args.command == "push":
        from tuner.oci.publish import publish

        published = publish(args.work_dir, args.image, _registry_options(args))
        print(f"pushed {args.image}@{published.digest}")
        return EXIT_OK
    if args.command == "pull":
        from tuner.oci.pull import pull_image

        pulled = pull_image(args.image, args.dest, _registry_options(args))
        print(f"pulled {args.image}@{pulled.digest}: {len(pulled.files)} files in {args.dest}")
        return EXIT_OK
    if args.command == "report":
        from tuner.observe import loss_curves
        from tuner.workdir import CURVE_FILE, WorkDir

        metrics = tuple(args.metric) if args.metric else loss_curves.DEFAULT_METRICS
        work = WorkDir(args.work_dir)
        out = loss_curves.draw(work.events, args.out or work.root / CURVE_FILE, metrics)
        print(f"wrote {out}")
        return EXIT_OK
    if args.command == "chat":
        from tuner.train.chat import chat

        print(chat(args.preset, args.adapter, args.prompt, max_new_tokens=args.max_new_tokens))
        return EXIT_OK
    if args.command == "fetch":
        from tuner.job import fetch_job

        marker, inputs = fetch_job(args.workspace, work_dir=args.work_dir, allow_private_urls=args.allow_private_urls,
                                   registry=_registry_options(args))
        events.info(f"fetched {len(inputs)} input files ({sum(f.size for f in inputs):,} bytes): {marker}")
        return EXIT_OK
    from tuner.job import run_job
    from tuner.spec.plan import plan_job

    plan = plan_job(args.workspace, config_path=args.config, output=args.output,
                    work_dir=getattr(args, "work_dir", None), allow_private_urls=args.allow_private_urls,
                    registry=_registry_options(args), merged_image=args.merged_image)
    if args.command == "validate":
        for note in plan.notes:
            print(f"note: {note}")
        for warning in plan.warnings:
            print(f"warning: {warning}")
        print(f"ok: {plan.workspace.metadata.name}: {plan.workspace.tuning.method} on {plan.preset.name}, "
              f"config {plan.config.digest()[:19]}")
        return EXIT_OK
    with _metrics(args, plan):
        run_job(plan, skip_fetch=args.skip_fetch, restart=args.restart)
    return EXIT_OK


def exit_with(code: int) -> None:
    """Exit with `code`. A torchrun worker leaves through os._exit once its output is flushed: its
    process group is already destroyed, and the C++ destructors that run at a normal exit sometimes
    abort (`terminate called without an active exception`, exit -6 instead of tuner's code) when the
    launcher's store goes away first, which turned a user error or a preemption into a crash."""
    from tuner.train.distributed import ranks_from_env

    if ranks_from_env().distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

