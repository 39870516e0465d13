"""Convert a labelled dataset (Kaggle, nnU-Net raw 2-D or folder pairs: see layouts.py) to NumPy arrays (run once).

    python data.py                                   # input/train, input/test -> input/*.npy
    python data.py --dataset DIR --classes nerve,vessel --arrays input/mine   # your own scans
    python data.py --synthetic                       # first write a synthetic dataset there (no data needed)
    python data.py --check                           # report every problem in the input folders, write nothing

Images may be PNG, JPEG, TIFF or BMP, 8- or 16-bit, gray or RGB(A) (converted to gray), of any size. Each is
kept at its own size, in the top left of a canvas as large as the largest (all of Kaggle's are 420x580), with
its size beside it. Masks become label maps: 0 background, k the k-th structure. Arrays: train_images,
train_masks, train_ids, train_subjects (the groups validation holds out together), train_sizes, test_images,
test_ids, test_sizes; arrays.json says what they were built from. nerve/store.py reads them back, checked.
"""

from pathlib import Path

from nerve.common import (
    INPUT_DIR,
    Renamed,
    UserError,
    add_flags,
    arg_parser,
    parse_size,
    run_cli,
)

from tqdm import tqdm

from nerve import layouts, synthetic
from nerve.store import WORKERS, convert


def write_synthetic(args, layout):
    """Write the synthetic dataset --synthetic asks for into the empty folders of args.dataset."""
    if layout == "folders":
        raise UserError("--synthetic writes the kaggle or nnunet layout")
    if (args.vessels or args.size) and layout != "nnunet":
        raise UserError("--vessels and --size write the nnU-Net layout: add --layout nnunet")
    if min(args.subjects, args.frames, args.test_subjects) < 1:
        raise UserError("--subjects, --frames and --test-subjects must be at least 1")
    existing = [d for d in map(args.dataset.joinpath, synthetic.FOLDERS[layout]) if d.is_dir() and any(d.iterdir())]
    if existing:
        raise UserError(
            f"{existing[0]}/ is not empty; --synthetic only writes into empty folders "
            "(use --dataset DIR for another folder)"
        )
    total = (args.subjects + args.test_subjects) * args.frames
    with tqdm(total=total, desc="synthetic", unit="img", leave=False) as bar:
        n_train, n_test = synthetic.write_dataset(
            args.dataset,
            args.subjects,
            args.frames,
            args.test_subjects,
            args.seed,
            progress=bar.update,
            layout=layout,
            size=parse_size(args.size) if args.size else None,
            vessels=args.vessels,
        )
    print(f"wrote a synthetic dataset to {args.dataset}/: {n_train} train pairs, {n_test} test images")


def main(argv=None):
    # fmt: off
    ap = arg_parser(__doc__)
    ap.add_argument("--dataset", "--input", type=Path, default=INPUT_DIR, action=Renamed,
                    help="the dataset's folder (see nerve/layouts.py)")
    ap.add_argument("--arrays", "--output", type=Path, default=None, action=Renamed,
                    help="where the arrays go; unset: --dataset itself")
    ap.add_argument("--layout", choices=("auto", *layouts.LAYOUTS), default="auto",
                    help="auto: found from the folders (with --synthetic: kaggle)")
    ap.add_argument("--classes", default=None,
                    help="the structures' names in label order (nerve,vessel) or a JSON file of them; "
                         "unset: the layout's own (Kaggle: nerve; nnU-Net: dataset.json), else class1, class2, ...")
    add_flags(ap, "groups", "group-pattern", "spacing")
    ap.add_argument("--force", action="store_true", help="rebuild the arrays even if they are up to date")
    ap.add_argument("--check", action="store_true", help="report every problem in the input folders; write nothing")
    ap.add_argument("--workers", type=int, default=WORKERS, help="decoding threads")
    syn = ap.add_argument_group("synthetic data")
    syn.add_argument("--synthetic", action="store_true", help="first write a synthetic dataset (--layout kaggle "
                     "or nnunet)")
    syn.add_argument("--subjects", type=int, default=8, help="synthetic train subjects")
    syn.add_argument("--frames", type=int, default=120, help="frames per synthetic subject")
    syn.add_argument("--test-subjects", type=int, default=2, help="synthetic subjects for test")
    syn.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    syn.add_argument("--vessels", action="store_true", help="label the vessels too (nnU-Net layout)")
    syn.add_argument("--size", default=None, help="synthetic frame size HxW (nnU-Net layout); unset: 420x580")
    # fmt: on
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")

    layout = args.layout
    if args.synthetic:
        layout = "kaggle" if layout == "auto" else layout
        write_synthetic(args, layout)
    print(
        convert(
            args.dataset,
            force=args.force,
            check_only=args.check,
            workers=args.workers,
            output_dir=args.arrays,
            layout=layout,
            classes=args.classes,
            groups=args.groups,
            group_pattern=args.group_pattern,
            spacing=args.spacing,
        )
    )


if __name__ == "__main__":
    run_cli(main)
