"""Erector spinae muscle on a real abdominal CT series: DICOM slices with a NIfTI label map.

Data: ../shared/datasets/ct_abdomen_totalseg (one 20-slice series, 512 x 512, stored values + RescaleIntercept
-1024 = Hounsfield units). The label map holds 31 TotalSegmentator structures; the left and right autochthon
(erector spinae, ids 86 and 87) become one "muscle" class and every other structure background. The label
map is placed on the DICOM grid through the two affines, not by array order. Model outputs, not manual
annotations: good for testing the mechanics, not for quoting clinical accuracy.
"""

CONFIG = {
    "experiment": "ct_dicom_muscle",
    "classes": ["background", "muscle"],
    "paths": {"preloaded_root": "../preloaded_dataset", "experiments_root": "../experiments"},
    "preload": {
        "input_dir": "../../shared/datasets/ct_abdomen_totalseg",
        "pairs": [["dicom", "dicom_labels.nii.gz"]],
        "label_map": {86: 1, 87: 1},
        "unmapped_labels": "background",
        "normalization": {"method": "ct_window", "window": [-250.0, 250.0]},
        "image_size": [256, 256],
        # The DICOM series is read as (rows, columns, slices): axial slices lie along the last axis.
        "slice_axis": 2,
        # One series is one volume, so grouping by volume would leave nothing to test on: here every slice
        # is its own group. Neighbouring 3 mm slices are alike, so test figures on this set are optimistic.
        "group_pattern": None,
    },
    "train": {"epochs": 50, "time_budget_minutes": 5.0},
    "evaluate": {"display_window": [-200.0, 200.0]},
}
