"""A copy of a bundle with one preprocessing key changed, for inference-only measurements (never to ship).

The stage-1 ONNX files carry the spec in their metadata and the manifest holds every file's sha256, so
both are rewritten in the copy; the bundle's name gets a "-respec" suffix and its version stays. Used
for the nineteenth run's inference-only check (docs/training.md): bundle 0.4.0 with the bolus
normalised at inference, although it was trained without:

    .venv/bin/python scripts/respec_bundle.py models/demo /tmp/bundle-bolus --set bolus_reference_hu=350
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import onnx

from node.bundle import MANIFEST, SPEC_METADATA_KEY, load_bundle, sha256_of
from node.preprocess import PreprocessSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="changes", action="append", required=True, metavar="KEY=VALUE",
                        help="a preprocessing key and its JSON value")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists: choose a new folder", file=sys.stderr)
        return 2
    shutil.copytree(args.bundle, args.out)
    manifest = json.loads((args.out / MANIFEST).read_text())
    for change in args.changes:
        key, _, value = change.partition("=")
        manifest["preprocess"][key] = json.loads(value)
    PreprocessSpec.from_dict(manifest["preprocess"])  # refuses a spec the node could not use
    manifest["name"] += "-respec"
    for entry in manifest["files"]:
        path = args.out / entry["path"]
        if entry["stage"] == "stage1":
            model = onnx.load(str(path))
            for prop in model.metadata_props:
                if prop.key == SPEC_METADATA_KEY:
                    prop.value = json.dumps(manifest["preprocess"])
            onnx.save(model, str(path))
        entry["sha256"] = sha256_of(path)
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"wrote {args.out}: {load_bundle(args.out).spec}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
