"""`python -m convert MODEL_DIR OUT_DIR [--components llm,flow,hift]`."""
from __future__ import annotations

import argparse
import os
import sys
import time

from convert.common import ConversionError
from convert.registry import COMPONENTS, component_module, convert_component, save_params
from cosyjax.config import ModelConfig, ModelFolderError
from cosyjax.io.hyperyaml import YamlError
from cosyjax.io.torch_checkpoint import CheckpointError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert",
                                 description="Convert CosyVoice checkpoints to orbax JAX parameter trees.")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--components", default=",".join(COMPONENTS),
                    help="comma-separated subset of %s" % ",".join(COMPONENTS))
    args = ap.parse_args(argv)
    try:
        cfg = ModelConfig.from_dir(args.model_dir)
        names = [c.strip() for c in args.components.split(",") if c.strip()]
        for name in names:
            component_module(name)  # validates the name early
        os.makedirs(args.out_dir, exist_ok=True)
        for name in names:
            t0 = time.time()
            params = convert_component(name, cfg)
            out = os.path.join(args.out_dir, name)
            save_params(out, params)
            print(f"{cfg.version} {name}: {cfg.path(component_module(name).CHECKPOINT)} -> {out} "
                  f"({time.time() - t0:.1f} s)")
    except (ModelFolderError, YamlError, CheckpointError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
