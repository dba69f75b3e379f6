"""`atelier samplers`: list the named samplers, their aliases and the schedules each can use."""

from __future__ import annotations

import argparse



def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "samplers",
        help="list named samplers (A1111 and ComfyUI names) and their schedules",
        description=(
            "List the samplers atelier can build on a model's diffusers scheduler config: canonical "
            "name, A1111 and ComfyUI aliases, diffusers class and the schedule types each accepts. "
            "With NAME, show how that name (any alias, or an old combined name like "
            "'DPM++ 2M Karras') resolves and the exact scheduler options it sets."
        ),
    )
    parser.add_argument("name", nargs="?", help="a sampler name to resolve, e.g. 'dpmpp_2m' or 'LMS Karras'")
    parser.add_argument("--schedule", help="schedule type to resolve with NAME, e.g. karras or 'SGM Uniform'")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atelier.cli import print_json
    from atelier.samplers.registry import list_samplers, resolve, schedule_options
    from atelier.samplers.schedules import SCHEDULE_OPTIONS

    if args.name is None:
        if args.schedule:
            from atelier.errors import UserError

            raise UserError("--schedule needs a sampler NAME")
        entries = list_samplers()
        if args.json:
            print_json({"samplers": entries, "schedules": SCHEDULE_OPTIONS})
        else:
            print(_table(entries))
        return 0

    choice = resolve(args.name, args.schedule)
    entry = next(e for e in list_samplers() if e["name"] == choice.name)
    resolved = {
        "requested": args.name,
        "sampler": choice.name,
        "schedule": choice.schedule,
        "diffusers_class": entry["diffusers_class"],
        "options": schedule_options(choice.spec, choice.schedule),
        "entry": entry,
    }
    if args.json:
        print_json(resolved)
    else:
        print(f"{args.name!r} -> {choice.name} on schedule {choice.schedule or 'model default'}")
        print(f"  {entry['diffusers_class']}(")
        for key, value in resolved["options"].items():
            print(f"      {key}={value!r},")
        print("  )  + the model's betas, prediction type, spacing and offsets")
        if entry["notes"]:
            print(f"  note: {entry['notes']}")
    return 0


def _table(entries: list[dict]) -> str:
    from atelier.samplers.schedules import SCHEDULE_OPTIONS

    rows = [("sampler", "aliases", "diffusers class", "schedules")]
    for e in entries:
        aliases = ", ".join(e["aliases"] + e["a1111_legacy_names"])
        schedules = ", ".join(e["schedules"]) or "own"
        rows.append((e["name"] + (" *" if e["stochastic"] else ""), aliases, e["diffusers_class"], schedules))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("* stochastic.  Schedules: " + ", ".join(SCHEDULE_OPTIONS) + "; none = the model's own.")
    lines.append("'beta' is A1111's Beta (= diffusers use_beta_sigmas), not ComfyUI's beta.")
    return "\n".join(lines)
