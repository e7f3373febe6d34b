"""``wrpo data {prompts,sample,score,build,split,tiny-model} ...``: front end of ``wrpo.data.construct``.

A malformed input stops the command with one line ``wrpo data CMD: FILE line N: what is wrong`` and exit
code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from wrpo.data.preference import DataError

DESCRIPTION = """From prompts to WRPO training data (arXiv 2412.03187):
  prompts -> sample (each source model, the target) -> score -> build -> split -> wrpo sft / wrpo train"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wrpo data", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary)

    s = add("prompts", "prompt rows {prompt_id, prompt} from any data file with prompts")
    s.add_argument("--input", required=True, help="JSONL rows with a 'prompt' (e.g. the released layout)")
    s.add_argument("--output", required=True)
    s.add_argument("--limit", type=int, help="only the first N rows")

    s = add("sample", "N responses per prompt from a local model (transformers generate)")
    s.add_argument("--model", required=True, help="model directory (save_pretrained), with a chat template")
    s.add_argument("--input", required=True, help="JSONL rows with 'prompt_id' and 'prompt'")
    s.add_argument("--output", help="default: samples-NAME.jsonl next to the input")
    s.add_argument("--model-name", help="the responses' 'model' field (default: the model directory's name)")
    s.add_argument("--n", type=int, default=5, help="samples per prompt (default 5)")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="default: cuda when available, else cpu")

    s = add("score", "fill every response's score with a local reward model or a reward function")
    s.add_argument("--input", required=True, help="sample rows (with their prompt)")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--reward-model", help="sequence-classification model dir, num_labels=1")
    how.add_argument(
        "--reward-fn",
        metavar="MODULE:FUNCTION",
        help="FUNCTION(prompt, response, row) -> float per response: prompt = the chat messages, response "
        "= its text, row = the sample row dict (e.g. wrpo.data.construct.verifiers:arithmetic_exact_match)",
    )
    s.add_argument("--output", help="default: rewrite the input in place")
    s.add_argument("--batch-size", type=int, default=8, help="responses per forward pass (--reward-model)")
    s.add_argument("--max-length", type=int, default=4096, help="tokens kept (--reward-model)")
    s.add_argument("--device", help="default: cuda when available, else cpu")

    s = add("build", "scored samples -> quadruples (x, y_ws, y_wt, y_l) in the released layout")
    s.add_argument("--sources", required=True, nargs="+", action="extend", help="scored source sample files")
    s.add_argument("--targets", required=True, help="scored samples of the target model")
    s.add_argument("--output", required=True)
    s.add_argument(
        "--num-source-chosen", type=int, default=1, help="k source picks from k distinct models (default 1)"
    )
    s.add_argument(
        "--keep-tied",
        action="store_true",
        help="keep prompts whose target samples all score the same (SFT rows: wrpo sft uses y_ws only)",
    )

    s = add("split", "disjoint sft.jsonl / pref.jsonl, deterministic for a seed")
    s.add_argument("--input", required=True)
    s.add_argument("--sft-fraction", type=float, default=1 / 3, help="default 1/3 (the paper's)")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--out-dir", required=True)

    s = add("tiny-model", "save a random-init tiny model + tokenizer (offline plumbing checks)")
    s.add_argument("--output", required=True)
    s.add_argument("--seed", type=int, default=0, help="initialisation seed")
    s.add_argument("--reward-model", action="store_true", help="a one-output classifier (meaningless scores)")
    return p


def options_of(args: argparse.Namespace, names) -> dict:
    """``{name: args.name}``: the keyword options a command passes on as they were parsed."""
    return {name: getattr(args, name) for name in names}


def run(args: argparse.Namespace) -> None:
    if args.command == "prompts":
        from wrpo.data.construct.prompts import extract_prompts

        n = extract_prompts(args.input, args.output, limit=args.limit)
        print(f"{n} prompts -> {args.output}")
    elif args.command == "sample":
        from wrpo.data.construct.sample import sample

        names = ("model_name", "seed", "device", "n", "temperature", "top_p", "max_new_tokens", "batch_size")
        output, n = sample(args.model, args.input, args.output, **options_of(args, names))
        print(f"{n} prompts x {args.n} samples -> {output}")
    elif args.command == "score" and args.reward_fn:
        from wrpo.data.construct.reward_fn import score_with_function

        n = score_with_function(args.input, args.reward_fn, args.output)
        print(f"{n} responses scored -> {args.output or args.input}")
    elif args.command == "score":
        from wrpo.data.construct.score import score

        options = options_of(args, ("batch_size", "max_length", "device"))
        n = score(args.input, args.reward_model, args.output, **options)
        print(f"{n} responses scored -> {args.output or args.input}")
    elif args.command == "build":
        from wrpo.data.construct.build import build

        print(
            build(
                args.sources,
                args.targets,
                args.output,
                num_source_chosen=args.num_source_chosen,
                keep_tied=args.keep_tied,
            )
        )
        print(f"-> {args.output}")
    elif args.command == "split":
        from wrpo.data.construct.split import split

        written = split(args.input, args.out_dir, sft_fraction=args.sft_fraction, seed=args.seed)
        print(", ".join(f"{n} rows -> {path}" for path, n in written.items()))
    elif args.command == "tiny-model":
        from wrpo.train.tiny import save_tiny_model

        path = save_tiny_model(args.output, seed=args.seed, reward_model=args.reward_model)
        print(f"tiny random {'reward model' if args.reward_model else 'model'} -> {path}")


def dashed(arg: str) -> str:
    """``--max_new_tokens[=V]`` -> ``--max-new-tokens[=V]``: ``wrpo data`` takes both spellings, as
    ``wrpo train`` does."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args([dashed(a) for a in argv])
    except SystemExit as e:  # usage errors (argparse printed them) and --help
        return e.code if isinstance(e.code, int) else 2
    try:
        run(args)
    except (DataError, ValueError, OSError) as err:
        print(f"wrpo data {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
