"""Run the pipeline step by step: uncomment the steps to run, then `python src/main.py`.

src/main.py uses configs/demo_l3_ct.py; change CONFIG in src/main.py to use another config.
Each line is the same as `segmenter <stage> --config configs/demo_l3_ct.py`; add "--set", "key=value" to
CONFIG to override single settings.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `stages` imports without installing

from stages import evaluate, predict, preload, train, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(ROOT / "configs" / "demo_l3_ct.py")]


def _shown(path: str) -> str:
    return Path(path).resolve().relative_to(ROOT).as_posix() if Path(path).resolve().is_relative_to(ROOT) else path


print(f"src/main.py uses {_shown(CONFIG[1])}; change CONFIG in src/main.py to use another config.")

# preload.main(CONFIG)                 # original dataset -> preloaded_dataset/<experiment>/
# tune.main(CONFIG)                    # hyperparameter search -> experiments/<experiment>/tune/
# train.main(CONFIG)                   # final model -> experiments/<experiment>/train/
# predict.main(CONFIG)                 # test-set masks -> experiments/<experiment>/predict/test/
# predict.main(CONFIG + ["--input", "original_dataset/new_scans"])   # masks for new images
# evaluate.main(CONFIG)                # metrics, figures, report -> experiments/<experiment>/evaluate/
