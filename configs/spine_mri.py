"""Multi-class sagittal spine MRI (background, disc, vertebra): PNG images with NPY masks.

Data: ../shared/datasets/spine_mri_sagittal beside the checkout (20 slices, 256 x 256). The 5 slices whose
annotation is missing or partial (masks 0, 5 and 10 are unlabelled, 1 and 13 lack the vertebrae, see the
dataset's README) are left out of the dataset by name: they are not negative cases, and a test case scored
against a missing annotation would measure the annotation, not the model. A default run:

    segmenter preload --config configs/spine_mri.py
    segmenter train --config configs/spine_mri.py
    segmenter predict --config configs/spine_mri.py
    segmenter evaluate --config configs/spine_mri.py
"""

CONFIG = {
    "experiment": "spine_mri",
    "classes": ["background", "disc", "vertebra"],
    "paths": {"preloaded_root": "../preloaded_dataset", "experiments_root": "../experiments"},
    "preload": {
        "input_dir": "../../shared/datasets/spine_mri_sagittal",
        "images_subdir": "images",
        "masks_subdir": "masks",
        "exclude_cases": ["0", "1", "5", "10", "13"],
        "normalization": {"method": "divide_255"},
        "image_size": [256, 256],
    },
    "train": {
        # Group normalisation: with 12 training slices and batch 4, batch-norm statistics never settle.
        "model": {"architecture": "unet", "depth": 4, "base_filters": 16, "normalization": "group"},
        "loss": "dice_ce",
        "batch_size": 4,
        "epochs": 400,
        "time_budget_minutes": 7.0,
        "augmentation": {"flip_horizontal": True, "flip_vertical": True},
    },
    # Nothing is learnt here in the first ~15 epochs (Dice takes off between epochs 15 and 25), so
    # Hyperband's 1- and 3-epoch rounds would only score noise: Bayesian optimisation with whole
    # 40-epoch trials, until the 20-minute budget is spent.
    "tune": {"tuner": "bayesian", "time_budget_minutes": 20.0, "max_epochs": 40, "max_trials": 100,
             "search_space": {"learning_rate": {"min": 3e-4, "max": 5e-3, "sampling": "log"},
                              "base_filters": [16, 32], "depth": [3, 4]}},
}
