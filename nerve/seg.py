"""DICOM Segmentation objects (SEG) of predict.py's masks, written with highdicom, so that a viewer or an archive
(3D Slicer, OHIF, a PACS) shows them over the study: one SEG per DICOM input, one segment per structure,
referencing the source instance. highdicom writes a SEG of a multi-frame source only where the source has a
frame of reference, which ultrasound cine loops rarely have."""

import warnings

from nerve.common import UserError, atomic_path

import numpy as np

# SNOMED CT codes of the structures this project's datasets label; other names are tissue
STRUCTURE_CODES = {"nerve": "Nerve", "vessel": "BloodVessel", "artery": "Artery", "vein": "Vein"}


def segment_descriptions(names):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="nerve two-headed U-Net", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=getattr(codes.SCT, STRUCTURE_CODES.get(name.lower(), "Tissue")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, name in enumerate(names)
    ]


def write_seg(path, source, labels, names):
    """A binary SEG at `path` of label maps (frames, rows, cols) predicted on the DICOM dataset `source`, one
    segment per structure of `names`; a UserError where highdicom cannot reference the source that way."""
    import highdicom as hd

    masks = np.stack([np.asarray(labels) == k + 1 for k in range(len(names))], axis=-1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's advice on the source's attributes (a person name's form)
            seg = hd.seg.Segmentation(
                source_images=[source],
                pixel_array=masks,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segment_descriptions(names),
                series_instance_uid=hd.UID(),
                series_number=900,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="ultrasound-nerve-segmentation",
                manufacturer_model_name="two-headed U-Net",
                software_versions="1",
                device_serial_number="none",
                omit_empty_frames=False,
            )
    except (ValueError, AttributeError) as e:  # a source highdicom cannot reference, or without what a SEG needs
        raise UserError(f"no DICOM SEG for {path.name}: {e}") from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
