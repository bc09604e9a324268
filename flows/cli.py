"""`qabot` command line.

    qabot up | down | status            local MLflow server, Prefect server and process worker
    qabot run --profile smoke|report    run the pipeline now (in this process), tracked in MLflow
    qabot run --config FILE.yaml        ... from a config file (may start from a preset with `profile:`)
    qabot deploy                        register prefect.yaml's deployments
    qabot demo                          up + deploy + run the smoke deployment through the worker
    qabot data prepare --source SRC --out DIR
    qabot config show|schema            print a resolved config / the JSON schema of RunConfig
    qabot score --answers FILE.jsonl    score answers ({"id", "answer"} rows) against the question set

Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


def _fail(msg: str, code: int = EXIT_FAILED) -> int:
    print(f"qabot: error: {msg}", file=sys.stderr)
    return code


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _load(args) -> object:
    from pipeline_lib.overrides import load_run_config

    return load_run_config(args.profile, args.config, getattr(args, "set", None) or ())


def _use_services(start: bool, worker: bool = False) -> dict:
    from flows import services

    if start:
        services.up(worker=worker)
    env = services.service_env()
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # a fresh home: Prefect's own database
    os.environ.update(env)
    return env


def cmd_up(args) -> int:
    from flows import services

    st = services.up(mlflow_port=args.mlflow_port, prefect_port=args.prefect_port, worker=not args.no_worker)
    where = f" (artifacts: {st['mlflow_artifacts']})" if st.get("mlflow_artifacts") else ""
    print(f"MLflow:  {st['mlflow_url']}{where}")
    print(f"Prefect: {st['prefect_url']}")
    if st.get("prefect_auth_file"):
        f = st["prefect_auth_file"]
        print(
            f"Prefect API and UI require HTTP basic auth; 'user:password' is in {f} (owner only). "
            f'Clients elsewhere: export PREFECT_API_AUTH_STRING="$(cat {f})"; the UI asks for it.'
        )
    print(f"State:   {services.qabot_home()}")
    return 0


def cmd_down(args) -> int:
    from flows import services

    stopped = services.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    for name in stopped.stale:
        print(f"{name}: {services.STALE}, not signalled")
    return 0


def cmd_status(args) -> int:
    from flows import services

    st = services.status()
    if not st["started"]:
        print("not started (qabot up)")
        return 0
    for name, item in st["services"].items():
        line = f"{name:8s} {item['state']:27s}"
        if item.get("pid"):
            line += f" pid {item['pid']:<8}"
        if item.get("url"):
            line += f" {item['url']}  " + ("answers" if item["answers"] else "does not answer")
        print(line.rstrip())
    pool = st["pool"]
    if "status" in pool:
        workers = pool.get("workers") or []
        online = [w for w in workers if w["status"] == "ONLINE"]
        limit = pool.get("concurrency_limit")
        print(
            f"pool     {pool['name']}: {pool['status']}, {len(online)} of {len(workers)} worker(s) online, "
            f"flow-run limit {limit if limit is not None else 'none'}"
        )
        for w in workers:
            age = w["heartbeat_age_s"]
            print(
                f"         {w['name']}: {w['status']}, last heartbeat {'never' if age is None else f'{age:.0f} s ago'}"
            )
    _print_prefect_overview(st)
    return 0


def _print_prefect_overview(st: dict) -> None:
    gcl = st.get("gpu_limit")
    if gcl:
        slots = f"{gcl['limit']} slot(s), {gcl['in_use']} in use" if "limit" in gcl else gcl.get("status")
        print(f"gpu      {gcl['name']}: {slots} (one training flow run per slot)")
    for s in st.get("schedules", []):
        on = "active" if s["active"] else "inactive: no runs are scheduled until it is switched on"
        print(f"schedule {s['deployment']}: {s['schedule']}, {on}")
    for r in st.get("upcoming", []):
        print(f"         next: {r['start']} {r['deployment']} ({r['name']})")
    if "flow_runs" in st:
        print(f"runs     {len(st['flow_runs'])} latest flow run(s)" + (":" if st["flow_runs"] else ""))
        for r in st["flow_runs"]:
            line = f"         {r['name']}: {r['state']}, {r['deployment']}, {r['start'] or 'not started'}"
            print(line + (f" - {r['message']}" if r["message"] else ""))
    elif st.get("flow_runs_error"):
        print(f"runs     unknown ({st['flow_runs_error']})")


def cmd_run(args) -> int:
    cfg = _load(args)
    from pipeline_lib.preflight import require

    require(cfg)  # seconds: stop before starting anything when the Hub, a file or the GPU is missing
    if args.no_track:
        os.environ["MLFLOW_TRACKING_URI"] = "off"
    _use_services(start=not args.no_services)
    from flows.finetune_compare import finetune_compare

    t0 = time.time()
    summary = finetune_compare(config=cfg)
    print(json.dumps({"seconds": round(time.time() - t0, 1), **summary}, indent=2, default=str))
    from flows.watch import summarize

    print("\n".join(["Summary:", *summarize(summary["report_dir"])]))
    _print_urls(summary)
    return 0


def _print_urls(summary: dict, flow_run_url: str | None = None) -> None:
    if flow_run_url:
        print(f"Prefect flow run: {flow_run_url}")
    if summary.get("parent_run_url"):
        print(f"MLflow parent run: {summary['parent_run_url']}")
    print(f"Report: {Path(summary['report_dir']) / 'report.md'}")


def cmd_deploy(args) -> int:
    from flows import services

    _use_services(start=True, worker=True)
    services.deploy()
    print("deployed: finetune-compare/smoke, finetune-compare/report, finetune-compare/report-weekly")
    return 0


def cmd_demo(args) -> int:
    from flows import services

    st = services.up(worker=True)
    os.environ.update(services.service_env())
    print(f"MLflow:  {st['mlflow_url']}\nPrefect: {st['prefect_url']}")
    services.deploy()
    from prefect.deployments import run_deployment

    params = None
    if args.profile != "smoke" or args.config:
        params = {"config": _load(args).model_dump(mode="json")}
    from flows.watch import summarize, watch

    fr = run_deployment(f"finetune-compare/{args.deployment}", parameters=params, timeout=0)
    flow_url = f"{st['prefect_url']}/runs/flow-run/{fr.id}"
    print(f"Prefect flow run: {flow_url}  (submitted; the worker starts it)", flush=True)
    fr = watch(str(fr.id), timeout=args.timeout, out=lambda line: print(line, flush=True))
    if not fr.state or not fr.state.is_completed():
        msg = fr.state.message if fr.state else "no state"
        state = fr.state.name if fr.state else "unknown"
        if args.timeout is not None and not (fr.state and fr.state.is_final()):
            return _fail(f"flow run {fr.name} still {state} after --timeout {args.timeout:g} s: {flow_url}")
        return _fail(f"flow run {fr.name} ended {state}: {msg}")
    if fr.state.message:  # e.g. why a scheduled run skipped training
        print(fr.state.message)
    summary = _find_summary(str(fr.id), st)
    print("\n".join(["Summary:", *summarize(summary["report_dir"])]))
    _print_urls(summary, flow_url)
    return 0


def cmd_serve(args) -> int:
    """`mlflow models serve` on a registered model's alias (`models:/NAME@ALIAS`), from this environment:
    `--env-manager local` installs nothing; the environment's scripts (uvicorn) are put first on PATH."""
    import re

    from flows import services
    from pipeline_lib.config import ConfigError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", args.model):
        raise ConfigError(f"serve: {args.model!r} is not a registered model name")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", args.alias):
        raise ConfigError(f"--alias: {args.alias!r} is not an alias name")
    env = {**os.environ, **services.service_env()}
    if not env.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("serve: no MLflow server known; run `qabot up` or set MLFLOW_TRACKING_URI")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    cmd = [str(Path(bindir) / "mlflow"), "models", "serve", "-m", f"models:/{args.model}@{args.alias}"]
    cmd += ["--env-manager", "local", "--host", args.host, "--port", str(args.port)]
    print(
        f"serving models:/{args.model}@{args.alias} on http://{args.host}:{args.port}/invocations", flush=True
    )
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def _find_summary(flow_run_id: str, st: dict) -> dict:
    """The parent MLflow run of a flow run (tagged with its id): its URL and the report's directory."""
    from pipeline_lib.config import qabot_home
    from pipeline_lib.runs import find_parent_run

    found = find_parent_run(st["mlflow_url"], flow_run_id)
    if found is None:
        return {"report_dir": "?", "parent_run_url": None}
    run_id, url = found
    return {"parent_run_url": url, "report_dir": str(qabot_home() / "reports" / run_id)}


def cmd_data_prepare(args) -> int:
    from pydantic import ValidationError

    from pipeline_lib.config import ConfigError, DataConfig

    for flag, value in (("--source", args.source), ("--out", args.out)):
        if not value.strip():
            raise ConfigError(f"{flag}: must not be empty")
    settings = {"source": args.source, "revision": args.revision, "sha256": args.sha256}
    if args.max_download_mb is not None:
        settings["max_download_mb"] = args.max_download_mb
    try:
        cfg = DataConfig(**settings)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "data"
        raise ConfigError(f"{flag}: {first['msg'].removeprefix('Value error, ')}") from None
    from pipeline_lib.data import prepare

    res = prepare(args.source, Path(args.out), cfg)
    d = res.to_dict()
    print(
        json.dumps(
            {k: d[k] for k in ("clean_path", "audit_path", "rows_in", "rows_out", "fingerprint")}, indent=2
        )
    )
    return 0


def cmd_config(args) -> int:
    if args.action == "schema":
        from pipeline_lib.config import RunConfig

        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    import yaml

    print(yaml.safe_dump(_load(args).model_dump(mode="json"), sort_keys=False))
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def cmd_score(args) -> int:
    from pipeline_lib.scoring import score_file, summarize

    answers = Path(args.answers)
    out = Path(args.out) if args.out else answers.with_name(answers.stem + ".scored.jsonl")
    rows = score_file(answers, args.questions, out)
    print(json.dumps({"answers": str(answers), "out": str(out), **summarize(rows)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qabot", description="Fine-tune small LLMs with QLoRA and compare them.")
    sub = p.add_subparsers(dest="command", required=True)

    def cfg_args(sp):
        sp.add_argument("--profile", choices=["smoke", "report"], default=None, help="preset (default smoke)")
        sp.add_argument("--config", help="YAML/JSON RunConfig file")
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set models.0.max_steps=20 (repeatable); profile=NAME starts "
            "from that preset",
        )

    sp = sub.add_parser("up", help="start MLflow, Prefect and a process worker")
    sp.add_argument("--no-worker", action="store_true")
    sp.add_argument("--mlflow-port", type=_port, help="default 5000, or a free port when taken")
    sp.add_argument("--prefect-port", type=_port, help="default 4200, or a free port when taken")
    sp.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show the local services").set_defaults(func=cmd_status)
    sp = sub.add_parser("run", help="run the pipeline now")
    cfg_args(sp)
    sp.add_argument("--no-services", action="store_true", help="do not start local servers (use env URLs)")
    sp.add_argument("--no-track", action="store_true", help="record nothing in MLflow")
    sp.set_defaults(func=cmd_run)
    sub.add_parser("deploy", help="register prefect.yaml's deployments").set_defaults(func=cmd_deploy)
    sp = sub.add_parser("demo", help="up + deploy + run a deployment through the worker, print URLs")
    cfg_args(sp)
    sp.add_argument("--deployment", default="smoke")
    sp.add_argument("--timeout", type=float, default=3600)
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("data", help="data stage on its own")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="acquire, validate and clean; write clean.jsonl and audit.json")
    dp.add_argument("--source", required=True, help="file, http(s) URL or Hugging Face dataset id")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--revision")
    dp.add_argument("--sha256", help="expected sha256 of the data file (64 hex digits)")
    dp.add_argument("--max-download-mb", type=float, help="largest file to download, in MB (default 2048)")
    dp.set_defaults(func=cmd_data_prepare)
    sp = sub.add_parser("config", help="print a resolved config or the schema")
    sp.add_argument("action", choices=["show", "schema"])
    cfg_args(sp)
    sp.set_defaults(func=cmd_config)
    sp = sub.add_parser("serve", help="serve a registered model's alias over REST (mlflow models serve)")
    sp.add_argument("model", help="registered model name, e.g. smoke-llama-tiny")
    sp.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5001)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("score", help="score a JSONL file of answers against the question set")
    sp.add_argument("--answers", required=True, help='JSONL file, one {"id": ..., "answer": ...} per line')
    sp.add_argument("--questions", help="question set markdown file (default: the built-in 15 questions)")
    sp.add_argument("--out", help="scored rows, JSONL (default: ANSWERS.scored.jsonl next to the answers)")
    sp.set_defaults(func=cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(key, value)  # no usage data sent from here unless the user asks for it
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as err:  # every failure ends as one line; details are in the logs and Prefect/MLflow
        if os.environ.get("QABOT_DEBUG"):
            raise
        from pipeline_lib.config import ConfigError

        code = EXIT_USAGE if isinstance(err, (ConfigError, ValueError)) else EXIT_FAILED
        code = _fail(_one_line(err), code)
        if getattr(err, "detail", ""):  # a service that failed: the last lines of its log
            print(err.detail, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
