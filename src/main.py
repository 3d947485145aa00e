"""Run the pipeline step by step: uncomment the steps to run, then `python src/main.py`.

Each line is the same as the `segmenter <stage>` command; pass --config to use another config file
(default: config.py if present, else config_template.py) and --set to override single settings.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `stages` imports without installing

from stages import evaluate, predict, preload, train, tune  # noqa: E402

CONFIG = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo_l3_ct.py")]

# preload.main(CONFIG)                 # original dataset -> preloaded_dataset/<experiment>/
# tune.main(CONFIG)                    # hyperparameter search -> experiments/<experiment>/tune/
# train.main(CONFIG)                   # final model -> experiments/<experiment>/train/
# predict.main(CONFIG)                 # test-set masks -> experiments/<experiment>/predict/test/
# predict.main(CONFIG + ["--input", "original_dataset/new_scans"])   # masks for new images
# evaluate.main(CONFIG)                # metrics, figures, report -> experiments/<experiment>/evaluate/
