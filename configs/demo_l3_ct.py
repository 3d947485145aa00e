"""Binary skeletal muscle on synthetic L3 CT slices (Hounsfield units), the embedded demo dataset.

`make demo` generates original_dataset/demo_l3_ct/ (CSV slices) and runs every stage with this config.
Settings not named here take the defaults documented in config_template.py.
"""

CONFIG = {
    "experiment": "demo_l3_ct",
    "classes": ["background", "muscle"],
    "paths": {"preloaded_root": "../preloaded_dataset", "experiments_root": "../experiments"},
    "preload": {
        "input_dir": "../original_dataset/demo_l3_ct",
        # Soft-tissue CT window: muscle (about +40 HU) and fat (about -100 HU) both stay in range.
        "normalization": {"method": "ct_window", "window": [-250.0, 250.0]},
        "image_size": [256, 256],
        # The generator draws a 400 mm field of view on 512 pixels (segmenter.demo_data.FIELD_OF_VIEW_MM).
        "pixel_spacing": [0.78125, 0.78125],
    },
    "tune": {"max_trials": 3, "max_epochs": 4, "time_budget_minutes": 2.0},
    "train": {"epochs": 12, "time_budget_minutes": 3.0, "model": {"base_filters": 16, "depth": 4}},
    "evaluate": {"display_window": [-200.0, 200.0]},
}
