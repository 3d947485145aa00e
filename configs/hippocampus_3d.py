"""Hippocampus (anterior, posterior) in 3D: patches of whole MRI volumes (Medical Segmentation Decathlon Task04).

The 3D twin of ``hippocampus_2d.py``: same data, classes, seed and split (the test volumes are the same), so
the two are compared on the same test volumes. Data: ../shared/datasets/msd_hippocampus (200 NIfTI volumes
of about 35 x 50 x 35 voxels at 1 mm). Each volume is clipped to its own 0.5-99.5 percentiles and z-scored
(their intensity scales differ wildly); the planner picks the patch size, batch size and depth from the
median shape (40 x 56 x 40, depth 3 at 1 mm, as nnU-Net plans this task). Training draws patches with
nnU-Net's 3D augmentation, a third of them centred on hippocampus; prediction slides a window over each
whole test volume.

    segmenter preload --config configs/hippocampus_3d.py
    segmenter train --config configs/hippocampus_3d.py
    segmenter predict --config configs/hippocampus_3d.py
    segmenter evaluate --config configs/hippocampus_3d.py
"""

CONFIG = {
    "experiment": "hippocampus_3d",
    "classes": ["background", "anterior", "posterior"],
    "paths": {"preloaded_root": "../preloaded_dataset", "experiments_root": "../experiments"},
    "preload": {
        "input_dir": "../../shared/datasets/msd_hippocampus",
        "images_subdir": "imagesTr",
        "masks_subdir": "labelsTr",
        "spatial_dims": 3,
        "normalization": {"method": "percentile_zscore", "percentiles": [0.5, 99.5]},
        "group_pattern": r"^(hippocampus_\d+)",
    },
    "train": {
        # About 3.7 patches a second on 2 CPU cores: 28 epochs of 320 patches (40 minutes) and the other stages
        # fit in 45 minutes; poly decay (nnU-Net) ends at the last epoch; the time budget is a safety net.
        "epochs": 28,
        "patches_per_epoch": 320,
        "lr_schedule": "poly",
        "learning_rate": 0.003,
        "time_budget_minutes": 41,
        # The planner's batch of 8 fits in memory, but on a CPU a patch costs the same at any batch size:
        # batches of 2 (as nnU-Net trains most 3D models) give four times the updates in the same time.
        "batch_size": 2,
        "model": {"base_filters": 16},
    },
    # Each test volume is one or two patches: mirroring (8 flips averaged) costs seconds here.
    "predict": {"mirror": True},
}
