#!/usr/bin/env python
"""One table of how well every method's maps sit on the lesions: detector CAMs (rule heatmaps) and
zero-shot image-text similarity maps with their random-map and centre-prior baselines (rule
zeroshot), all scored by cxrssl.evaluation.localization (mean and 95 percent bootstrap CI).

    python scripts/summarize_localization.py --cam torchvision random 128 0 .../localization.json \
        --zeroshot nih results/zeroshot/multimodal/nih/localization.json --csv c.csv --markdown c.md
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cam", nargs=5, action="append", default=[],
                        metavar=("ENGINE", "INIT", "RES", "SEED", "JSON"), help="A heatmap run's localization.json.")
    parser.add_argument("--zeroshot", nargs=2, action="append", default=[], metavar=("BOXES", "JSON"),
                        help="A zero-shot run's localization.json and its box layout.")
    parser.add_argument("--csv", required=True, help="Table as CSV.")
    parser.add_argument("--markdown", required=True, help="Table as Markdown.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    args = parser.parse_args(argv)

    import pandas as pd

    from cxrssl.errors import BadInputError
    from cxrssl.evaluation.localization import METRICS, comparison_markdown, comparison_rows
    from cxrssl.io import atomic_write_csv, atomic_write_text
    from cxrssl.utils import setup_logging

    setup_logging(args.log)

    def read(path: str, key: str) -> dict:
        try:
            data = json.loads(open(path).read())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(path, f"not a readable localization.json ({exc})") from None
        if not isinstance(data, dict) or key not in data:
            raise BadInputError(path, f"not a localization.json: no {key!r}")
        return data

    cams = [(dict(engine=e, init=i, res=r, seed=s), read(p, "summary")) for e, i, r, s, p in args.cam]
    zeroshot = [(b, read(p, "queries")) for b, p in args.zeroshot]
    rows = comparison_rows(cams, zeroshot)
    columns = ["maps", "method", "boxes", "query", "setting",
               *[c for m in METRICS for c in (m, f"{m}_ci_low", f"{m}_ci_high")]]
    atomic_write_csv(pd.DataFrame(rows, columns=columns), args.csv)
    atomic_write_text(comparison_markdown(rows), args.markdown)


if __name__ == "__main__":
    main()
