"""The library the commands at the top call; nothing here imports a command. In the order an image travels:

common      folders, file names, flags, one-line errors, atomic writes, state files (imported first)
layouts     which files make a dataset (Kaggle, nnU-Net, folder pairs); synthetic: a dataset to try it on
images      a file -> uint8 gray image or label map; store: the .npy arrays data.py writes and load_arrays
splits      subject-grouped folds; planning: training size and length; neardup: near-duplicate frames
model       the two-headed U-Net and its losses; augment: resizing, augmented batches, crop views
checkpoint  best model and --resume state; monitor: logs, TensorBoard, pictures; distribute: data parallel
ood         the out-of-distribution score; postprocess: tuned gate and presence temperature
crossval    the out-of-fold store, cross-validated scores and their tables; cases: cases.csv, detection rates,
            intervals over groups; report: report.html and MODEL_CARD.md
inference   loading a run's models, mirror views, chunked prediction; deploy: to and from the model's size,
            the gate, smoothing (NumPy and OpenCV only: copied beside an export); sources: scans, videos, DICOM
predictor   a frame's regions predicted, post-processed, measured and drawn; seg: DICOM SEG out; live: streams
metrics     Dice, IoU, AUC, calibration, boundary distances; rle: Kaggle's run-length codes; figures: pictures
"""
