"""`python -m convert MODEL_DIR OUT_DIR [--components llm,flow,hift]`.

Converts every component first and writes nothing unless all of them convert: one error message lists
the problems of the yaml and of every checkpoint (`convert.registry.convert_model`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from convert.registry import COMPONENTS, component_module, convert_model, save_params
from cosyjax.errors import CosyJaxError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert",
                                 description="Convert CosyVoice checkpoints to orbax JAX parameter trees.")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--components", default=",".join(COMPONENTS),
                    help="comma-separated subset of %s" % ",".join(COMPONENTS))
    args = ap.parse_args(argv)
    try:
        names = [c.strip() for c in args.components.split(",") if c.strip()]
        for name in names:
            component_module(name)  # validates the names before any work
        t0 = time.time()
        cfg, trees = convert_model(args.model_dir, names)
        os.makedirs(args.out_dir, exist_ok=True)
        for name, params in trees.items():
            out = os.path.join(args.out_dir, name)
            save_params(out, params)
            print(f"{cfg.version} {name}: {cfg.path(component_module(name).CHECKPOINT)} -> {out}")
        print(f"converted {len(trees)} component(s) in {time.time() - t0:.1f} s")
    except (CosyJaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
