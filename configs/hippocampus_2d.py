"""Hippocampus (anterior, posterior) on axial slices of 3D MRI volumes (Medical Segmentation Decathlon Task04).

Data: ../shared/datasets/msd_hippocampus (200 NIfTI volumes about 35 x 50 x 35 voxels at 1 mm). Each volume
is cut into 2D slices along the last axis; slices keep their volume's id, and no volume has slices in both
train and test. Intensity scales differ wildly between volumes: each slice is clipped to its 0.5-99.5
percentiles and z-scored. Only slices that show some hippocampus are trained on (keep_empty_slices filters
training samples); the test volumes are predicted and scored whole, in 3D.
"""

CONFIG = {
    "experiment": "hippocampus_2d",
    "classes": ["background", "anterior", "posterior"],
    "paths": {"preloaded_root": "../preloaded_dataset", "experiments_root": "../experiments"},
    "preload": {
        "input_dir": "../../shared/datasets/msd_hippocampus",
        "images_subdir": "imagesTr",
        "masks_subdir": "labelsTr",
        "slice_axis": 2,
        "normalization": {"method": "percentile_zscore", "percentiles": [0.5, 99.5]},
        "image_size": [64, 64],
        "keep_empty_slices": False,
        "group_pattern": r"^(hippocampus_\d+)",
    },
    "train": {"batch_size": 16, "epochs": 30, "model": {"depth": 3, "base_filters": 16}},
}
