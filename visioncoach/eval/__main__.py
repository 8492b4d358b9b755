"""``python -m visioncoach.eval {charades,vstar,mcq} --pred PRED.jsonl --gt GT [--out metrics.json]``

Prints the metric table (stdout), the problems found in the predictions (stderr), and writes
the metrics as JSON (``--out``, default ``PRED.metrics.json``). Exit status 0 when metrics
were computed (bad prediction lines included), 2 for unusable inputs or flags.
"""

from __future__ import annotations

import argparse
import os
import sys

from visioncoach.eval import charades, mcq, vstar
from visioncoach.eval.common import EvalInputError, default_out_path, write_json
from visioncoach.eval.judge import JUDGES, build_judge


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.eval",
                                description="Benchmark metrics from a predictions JSONL file.")
    sub = p.add_subparsers(dest="bench", required=True)

    def common(name: str, help: str, gt_help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--pred", required=True, help="predictions JSONL (visioncoach.predict's output)")
        s.add_argument("--gt", required=True, help=gt_help)
        s.add_argument("--out", help="metrics JSON to write (default: PRED.metrics.json)")
        return s

    c = common("charades", "Charades-STA R@0.3/0.5/0.7 and mIoU",
               "annotation file, lines 'VID start end##query'")
    c.add_argument("--durations", help="JSON {vid: seconds}: clamp ground-truth ends to the video length")
    v = common("vstar", "V-STAR Acc, tIoU, vIoU, AM, LGM, mAM, mLGM", "the released V-STAR JSON")
    v.add_argument("--judge", choices=JUDGES, default="exact",
                   help="answers without a judge_score: exact = normalised exact match (offline), "
                        "http = OpenAI-compatible endpoint, local = a local checkpoint (default: exact)")
    v.add_argument("--judge-url", help="http judge: API base, e.g. http://127.0.0.1:8000/v1")
    v.add_argument("--judge-model", help="http judge: model name; local judge: checkpoint folder")
    v.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="http judge: environment variable holding the API key (unset: no key sent)")
    v.add_argument("--judge-timeout", type=float, default=60.0, help="http judge: seconds per request")
    v.add_argument("--judge-retries", type=int, default=3, help="http judge: retries after a failure")
    v.add_argument("--judge-workers", type=int, default=8, help="http judge: requests in flight at once")
    v.add_argument("--device", default="auto", help="local judge: cpu, cuda, cuda:N or auto")
    common("mcq", "multiple-choice accuracy overall and per category",
           "questions JSONL with id, answer and category")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.bench == "charades":
            metrics, problems = charades.evaluate(args.gt, args.pred, args.durations)
            text = charades.table(metrics)
        elif args.bench == "vstar":
            try:
                judge = build_judge(args.judge, url=args.judge_url, model=args.judge_model,
                                    api_key=os.environ.get(args.judge_api_key_env) or None,
                                    timeout=args.judge_timeout, retries=args.judge_retries,
                                    workers=args.judge_workers, device=args.device)
            except (ValueError, FileNotFoundError) as exc:
                raise EvalInputError(str(exc)) from None
            metrics, problems = vstar.evaluate(args.gt, args.pred, judge)
            text = vstar.table(metrics)
        else:
            metrics, problems = mcq.evaluate(args.gt, args.pred)
            text = mcq.table(metrics)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems.report()
    print(text)
    out = args.out or default_out_path(args.pred)
    write_json(out, metrics)
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
