"""Every setting of every segmenter stage, documented, with its default.

Copy this file to ``config.py`` (git-ignored) and edit it; the stages use ``config.py`` when it exists in
the current folder, else this template. Ready-made configs for the supported use cases are in
``configs/``. Any setting can also be changed for one run from the command line with its dotted key:

    segmenter train --config configs/spine_mri.py --set train.epochs=5 --set train.model.base_filters=32

Relative paths in this file resolve against this file's folder; relative paths given with ``--set``
resolve against the folder you run the command from. A misspelt key is an error, not silently ignored.
"""

CONFIG = {
    # Name of the experiment: outputs go to <paths.preloaded_root>/<experiment>/ and
    # <paths.experiments_root>/<experiment>/.
    "experiment": "demo_l3_ct",
    # Class names in label order; index 0 is the background. Summaries and reports use these names.
    "classes": ["background", "muscle"],
    # Seed of the train/test split, the validation split of the search, weight initialisation and
    # augmentation. Re-running with the same seed and inputs gives the same split.
    "seed": 42,
    "paths": {
        "preloaded_root": "preloaded_dataset",
        "experiments_root": "experiments",
    },
    # ------------------------------------------------------------------------------------------------
    # 1. preload: original dataset -> preloaded_dataset/<experiment>/{manifest.json, train*.npz, test/}
    # ------------------------------------------------------------------------------------------------
    "preload": {
        # Folder of the original dataset, with images and masks in two subfolders paired by file name
        # (without the format suffix): images/<id>.csv pairs with masks/<id>.csv, images/7.png with masks/7.npy.
        # Each pair is a case: one 2D image or one 3D volume. Supported: CSV (one slice of numbers; header row
        # and , ; or tab delimiters detected), PNG (8/16 bit), NPY, NIfTI (.nii, .nii.gz; volumes are trained
        # on as slices along slice_axis, and tested whole) and DICOM (a .dcm file, or a subfolder of .dcm
        # files = one series, in Hounsfield units).
        # An nnU-Net / Medical Segmentation Decathlon folder (imagesTr/, labelsTr/, dataset.json) needs
        # nothing else: its dataset.json gives the experiment name, the classes, the channels and the
        # subfolders, for every one of those keys this config leaves out.
        "input_dir": "original_dataset/demo_l3_ct",
        "images_subdir": "images",
        "masks_subdir": "masks",
        # Channel names, in the order the model takes them. With more than one, every case has one image
        # file per channel named as nnU-Net names them: <case>_0000.nii.gz, <case>_0001.nii.gz, ... beside
        # the label map <case>.nii.gz. The channels of a case must share one grid.
        "channels": ["image"],
        # A fixed test set instead of the random split: the ids of the test cases, and/or test_dir, a folder
        # laid out like input_dir (images_subdir/, masks_subdir/) whose every case is a test case.
        "test_cases": [],
        "test_dir": None,
        # Cases left out of the dataset altogether, by id, e.g. images whose annotation is missing or partial
        # (they are not negative cases: tested, they would score the annotation, not the model).
        "exclude_cases": [],
        # Explicit [image, mask] pairs relative to input_dir, used instead of the two subfolders when given,
        # e.g. [["dicom", "dicom_labels.nii.gz"]] for a DICOM series with a NIfTI label map.
        "pairs": [],
        # Regular expression whose first group (or whole match) in a slice id names its patient or volume;
        # slices of one group never go to both train and test. None: every file is its own group.
        "group_pattern": None,
        # Source label -> class index, e.g. {255: 1} for 0/255 masks, or {86: 1, 87: 1} to merge two ids.
        "label_map": {},
        # "error": a mask label that is not in label_map must be a class index (else preload stops, naming
        # the file and labels). "background": only 0 and the labels in label_map are kept; every other
        # label, even one equal to a class index, becomes 0 (for multi-structure label maps).
        "unmapped_labels": "error",
        # Filters of the training samples only (the test cases are always whole and never chosen by their
        # labels): train only on slices whose (remapped) mask contains every listed label, e.g. [0, 1, 2]
        # ([] keeps all), and, with keep_empty_slices False, not on slices that are all background (e.g. the
        # many empty slices of a 3D volume).
        "require_labels": [],
        "keep_empty_slices": True,
        "normalization": {
            # ct_window: clip to window (HU) then scale to 0..1 (CT); minmax: per image to 0..1;
            # divide_255: 8-bit images to 0..1; zscore: per image to mean 0, sd 1 (MRI);
            # percentile_zscore: clip to the percentiles, then zscore (MRI with outliers); nnunet_ct (3D): clip
            # to the 0.5 / 99.5 percentiles of the foreground intensities of the whole training set, then
            # z-score with their mean and sd (nnU-Net's CT scheme; the statistics are in the manifest); none.
            # One setting for every channel, or a list of settings, one per channel (e.g. z-score for T2 and
            # none for ADC); each channel of each slice is normalised on its own.
            "method": "minmax",
            "window": [-200.0, 300.0],
            "percentiles": [0.5, 99.5],
        },
        # Training samples (2D slices) are resized to this (rows, columns): images linearly, masks nearest-
        # neighbour; predict resizes its inputs alike and writes label maps back at their own size.
        # Both must be divisible by 2**train.model.depth (16 for the default depth 4).
        "image_size": [256, 256],
        # Pixel spacing (row, column) in mm of 2D files whose format carries none (CSV, PNG, NPY), so
        # evaluate can report mm and cm²; None: distances in pixels. DICOM and NIfTI use their headers.
        "pixel_spacing": None,
        # Share of cases (rounded to whole folds of patients, see group_pattern) held out as the test set. A
        # dataset of one volume (e.g. one CT series) is split into a training part and one contiguous test
        # slab of this share of its slices, at a place drawn from the seed.
        "test_fraction": 0.2,
        # Axis along which 3D volumes are cut into 2D slices (2 = axial for RAS-oriented NIfTI).
        "slice_axis": 2,
        # Worker processes that read and preprocess files in parallel.
        "workers": 2,
        # Slices per shard file; a split larger than this is written as <split>-00000.npz, ... and streamed.
        "shard_size": 1024,
        # Skip bad image/mask pairs (listed in the manifest and printed) instead of stopping at the first.
        "skip_invalid": False,
        # 2: the model sees 2D slices (image_size, slice_axis above). 3: it sees 3D patches of whole volumes
        # (NIfTI, DICOM series, 3D NPY): each training volume is cropped (crop_to_nonzero), normalised per
        # channel and resampled to target_spacing (image_interpolation, label_interpolation); predict
        # prepares new volumes alike and takes its output back to each volume's own grid.
        "spatial_dims": 2,
        # mm per array axis that volumes are resampled to; None: the median spacing of the training volumes.
        "target_spacing": None,
        # [d, h, w] voxels of the 3D training patches; None: planned from the median shape (after
        # resampling) and plan_memory_mb, with the batch size and depth (unless train sets them).
        "patch_size": None,
        # Crop each volume to the box around its non-zero voxels first (MRI background); undone on output.
        "crop_to_nonzero": False,
        # Resampling of volumes: images "cubic" (splines, as nnU-Net) or "linear"; label maps "linear" (each
        # class's one-hot mask interpolated, the largest wins, as nnU-Net) or "nearest".
        "image_interpolation": "cubic",
        "label_interpolation": "linear",
        # Thick slices: a volume (or target spacing) whose coarsest spacing is more than this many times its
        # finest is resampled in-plane first, then along that axis by nearest slice (nnU-Net); None: never.
        "anisotropy_threshold": 3.0,
        # Memory (MB) the planner may plan one 3D training step for (activations and gradients).
        "plan_memory_mb": 2048.0,
    },
    # ------------------------------------------------------------------------------------------------
    # 2. tune: keras-tuner search on a validation split of the training set -> experiments/<experiment>/tune/
    # ------------------------------------------------------------------------------------------------
    "tune": {
        # "hyperband", "random" or "bayesian".
        "tuner": "hyperband",
        # At most this many trials, and at most this many epochs per trial.
        "max_trials": 10,
        "max_epochs": 20,
        # The search ends cleanly when this many minutes have passed, keeping the best so far (None: no limit).
        "time_budget_minutes": 20.0,
        # Share of the training slices (whole patients/volumes) used to score the trials.
        "validation_fraction": 0.2,
        # 1: score each trial on that one validation split. k >= 2: k-fold cross-validation instead (and
        # validation_fraction is not used): each trial trains k models on k folds of the training slices
        # (whole patients/volumes) and is scored by the mean of their k validation scores; k times slower.
        "folds": 1,
        "executions_per_trial": 1,
        # Replaces entries of segmenter.tuning.DEFAULT_SEARCH_SPACE (where every searchable name is listed)
        # by name: a list is a choice, a dict {"min", "max", "step", "sampling"} a range, a single value
        # fixes it, None drops it (the train section's value is used). Any field of train, train.model or
        # train.augmentation can be searched, plus "ct_window" (a list of [low, high] HU windows).
        # E.g. {"architecture": ["unet", "attention_unet"], "base_filters": [16, 32], "rotation_degrees": [0, 10]}.
        "search_space": {},
    },
    # ------------------------------------------------------------------------------------------------
    # 3. train: the final model on the whole training set -> experiments/<experiment>/train/
    # ------------------------------------------------------------------------------------------------
    "train": {
        "model": {
            # "unet", "attention_unet", "residual_unet", "mobilenetv2_unet", "deeplabv3plus" or "medpatchnet"
            # (a light encoder-decoder of dilated-convolution pyramid blocks). All but mobilenetv2_unet and
            # deeplabv3plus are 2D or 3D, as preload.spatial_dims says.
            "architecture": "unet",
            # Down-sampling levels and filters of the first level (doubling per level). For 3D the planned
            # depth is used unless this is set. None: 4 for 2D, the plan's for 3D.
            "depth": None,
            "base_filters": 16,
            # "group" (default: independent of batch statistics, right for small batches of medical
            # images), "instance", "batch" or "none".
            "normalization": "group",
            "dropout": 0.0,
            # "transpose" (learnt) or "resize" (bilinear then convolution) upsampling in the decoder.
            "upsampling": "transpose",
            # Encoder of deeplabv3plus: "mobilenetv2" or "resnet50".
            "backbone": "mobilenetv2",
            # Pretrained encoder for mobilenetv2_unet and deeplabv3plus: None, "imagenet" (downloads once)
            # or the path of a local Keras weights file for the encoder.
            "encoder_weights": None,
            # Keep a pretrained encoder frozen for this many epochs first.
            "freeze_encoder_epochs": 0,
            # Auxiliary outputs at the decoder's coarser levels whose losses join the main one in training
            # (nnU-Net's deep supervision); not for mobilenetv2_unet and deeplabv3plus.
            "deep_supervision": False,
            # 3D only: also give the network where each voxel of its patch lies in the volume, at every
            # level (MedPatchNet's position-conditioned convolutions); not for mobilenetv2_unet and deeplabv3plus.
            "position_conditioning": False,
        },
        # "dice", "jaccard", "cross_entropy", "dice_ce" (Dice + cross-entropy), "focal" or "tversky".
        "loss": "dice_ce",
        # One weight per class for the loss, or None for equal weights.
        "class_weights": None,
        # "adamw", "adam" or "sgd".
        "optimizer": "adamw",
        "learning_rate": 1e-3,
        "weight_decay": 1e-4,
        # None: 4 for 2D, the planned batch size for 3D.
        "batch_size": None,
        "epochs": 100,
        # Training stops cleanly after this many minutes (None: no limit); the model so far is kept.
        "time_budget_minutes": None,
        # Random augmentation of the training slices (image and mask together).
        "augmentation": {
            "flip_horizontal": True,
            "flip_vertical": False,
            "rotation_degrees": 0.0,
            "zoom": 0.0,
            # Contrast/brightness jitter as a fraction of the image's spread.
            "intensity": 0.0,
            # 3D (preload.spatial_dims 3): nnU-Net's augmentation, as TensorFlow ops in the input pipeline,
            # each with its own probability per patch; image and label map move together, labels stay exact.
            "volume": {
                # Each listed axis is mirrored with probability 0.5.
                "mirror_axes": [0, 1, 2],
                # Rotation about each axis, uniform in +-rotation_degrees; one scale factor in scale_range.
                "rotation_probability": 0.2,
                "rotation_degrees": 30.0,
                "scale_probability": 0.2,
                "scale_range": [0.7, 1.4],
                # A random displacement field smoothed by a Gaussian of elastic_sigma voxels, its largest
                # displacement about elastic_magnitude voxels (off by default, as in nnU-Net; slow on CPU).
                "elastic_probability": 0.0,
                "elastic_sigma": 4.0,
                "elastic_magnitude": 3.0,
                # Gaussian noise of a standard deviation up to noise_std (normalised units).
                "noise_probability": 0.1,
                "noise_std": 0.1,
                # Gaussian blur with sigma in blur_sigma voxels.
                "blur_probability": 0.2,
                "blur_sigma": [0.5, 1.0],
                # Intensities times a factor; contrast about the mean; gamma on the patch rescaled to 0..1.
                "brightness_probability": 0.15,
                "brightness_range": [0.75, 1.25],
                "contrast_probability": 0.15,
                "contrast_range": [0.75, 1.25],
                "gamma_probability": 0.3,
                "gamma_range": [0.7, 1.5],
            },
        },
        # Use tune/best_hyperparameters.json when it exists (False: always these settings).
        "use_tuned_hyperparameters": True,
        # float16 compute with float32 weights on GPUs with tensor cores (normalisation, softmax and loss stay
        # float32); None: on where TensorFlow sees a GPU, off on CPU (where it runs without a speed-up).
        "mixed_precision": None,
        # Train on several GPUs or machines (data parallel, synchronous): "none"; "mirrored":
        # tf.distribute.MirroredStrategy over all local GPUs (or, without GPUs, the logical devices TensorFlow
        # sees: SEGMENTER_CPU_DEVICES=N splits the CPU into N); "multi_worker":
        # tf.distribute.MultiWorkerMirroredStrategy across the machines described by the TF_CONFIG environment
        # variable (run `segmenter train` on each; worker 0 writes the outputs). batch_size is then the GLOBAL
        # batch size, split evenly over the replicas (a multiple of their number).
        "distribution": "none",
        # Training steps per compiled call; > 1 lowers per-step overhead for small images.
        "steps_per_execution": 1,
        # Share of the training set (whole patients/volumes, drawn with the seed) held out to validate each
        # epoch (val_ columns in history.csv, TensorBoard, the curves); 0.0: none, all slices train.
        "validation_fraction": 0.0,
        # Which model becomes model.keras: "best" (checkpoints/best/model.keras: highest validation mean
        # foreground Dice, or lowest training loss without validation) or "last"; None: "best" when
        # validation_fraction > 0, else "last".
        "keep": None,
        # Learning rate per epoch: "constant", "poly" (nnU-Net: lr * (1 - epoch / epochs) ** 0.9) or
        # "cosine" (down to 0 at the last epoch), after warmup_epochs epochs rising linearly to lr.
        "lr_schedule": "constant",
        "warmup_epochs": 0,
        # Stop after this many epochs without a better validation Dice (training loss without validation);
        # None: never early.
        "early_stopping_patience": None,
        # Clip each gradient to this L2 norm (the optimizer's clipnorm); None: no clipping.
        "gradient_clip_norm": None,
        # 3D: patches per epoch (None: one per training volume), in a seeded random order of the volumes,
        # and the share of them centred on a foreground voxel of a class drawn uniformly among those the
        # volume holds (nnU-Net: one third), so small classes are not starved.
        "patches_per_epoch": None,
        # k of the k-fold cross-validation run by `segmenter train --fold k|all` (train/fold_<k>/): each fold
        # validates on a fifth (for 5) of the training patients/volumes; predict then ensembles the folds.
        "folds": 5,
        "foreground_fraction": 0.3333333333333333,
    },
    # ------------------------------------------------------------------------------------------------
    # 4. predict -> experiments/<experiment>/predict/test/ and predict/<input folder>/ for --input
    # ------------------------------------------------------------------------------------------------
    "predict": {
        # Images (2D) or patches (3D) per model call.
        "batch_size": 8,
        # 3D: sliding-window prediction over each whole volume, patches overlapping by this share of their
        # size and blended with Gaussian weights (sigma 1/8 of the patch).
        "overlap": 0.5,
        # 3D: mirroring test-time augmentation (the 8 flips averaged, 8x the time); None: on where a GPU is.
        "mirror": None,
        # Predict with the mean probabilities of the train.folds fold models: None: when all exist (else
        # train/model/), True: always (an error when one is missing), False: never.
        "folds": None,
        # Keep only the largest connected component of each class (2D and 3D).
        "keep_largest_component": False,
        # 3D: also write probabilities/<case>.nii.gz, one float32 volume per class.
        "save_probabilities": False,
        # The model's compute precision: None: as trained (float32; float16 after mixed-precision training);
        # "bfloat16": convolutions in bfloat16, normalisation and softmax in float32: on a CPU with AVX512_BF16,
        # 1.9-2.1x as fast for the 2D U-Net of benchmarks/train_bench.py, 1.4x for its 3D one (group norm); test
        # Dice unchanged to 3 decimals on spine and hippocampus data (benchmarks/predict_precision.py);
        # "float32": full precision throughout.
        "precision": None,
    },
    # ------------------------------------------------------------------------------------------------
    # 5. evaluate -> experiments/<experiment>/evaluate/ (metrics.csv, summary.json, figures, report.html)
    # ------------------------------------------------------------------------------------------------
    "evaluate": {
        # Tolerance of the normalised surface Dice, in mm when the pixel spacing is known, else pixels.
        "nsd_tolerance": 2.0,
        # HD95: "max_directed", the larger of the two directed 95th percentiles (MONAI, DeepMind's
        # surface-distance, what nnU-Net and MONAI users report), or "pooled", the 95th percentile of both
        # directions pooled (medpy).
        "hd95": "max_directed",
        # Intensity window of the images in figures, in the original units (e.g. [-200, 200] HU for CT);
        # None: the 1st to 99th percentile of each image.
        "display_window": None,
        # Bootstrap resamples for the confidence interval of the mean Dice.
        "bootstrap_samples": 1000,
    },
}
