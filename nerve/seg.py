"""DICOM Segmentation objects (SEG) of predict.py's masks, so that a viewer or an archive (3D Slicer, OHIF, a PACS)
shows them over the study: one SEG per DICOM input, one segment per structure, a SEG frame per source frame and
segment, referencing the source instance (and its frame).

highdicom writes them, except for a multi-frame source without a frame of reference (most ultrasound cine
loops: the Frame of Reference module is optional in their IOD), which highdicom refuses; cine_seg builds that
SEG with pydicom, in the layout highdicom gives a single frame, the cine's frame as a second dimension
(TemporalPositionIndex) and each SEG frame's source frame named by ReferencedFrameNumber."""

import datetime
import warnings

from nerve.common import UserError, atomic_path

import numpy as np

SOFTWARE = {
    "Manufacturer": "ultrasound-nerve-segmentation",
    "ManufacturerModelName": "two-headed U-Net",
    "SoftwareVersions": "1",
    "DeviceSerialNumber": "none",
}
SERIES_NUMBER = 900
# what a SEG copies from its source to belong to the same patient and study (the standard requires them)
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

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
    segment per structure of `names`; a UserError where the source lacks what a SEG must reference."""
    import highdicom as hd

    masks = np.stack([np.asarray(labels) == k + 1 for k in range(len(names))], axis=-1)
    try:
        if len(masks) > 1 and "FrameOfReferenceUID" not in source:
            seg = cine_seg(source, masks, names)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # highdicom's advice on the source's attributes (a name's form)
                seg = hd.seg.Segmentation(
                    source_images=[source],
                    pixel_array=masks,
                    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                    segment_descriptions=segment_descriptions(names),
                    series_instance_uid=hd.UID(),
                    series_number=SERIES_NUMBER,
                    sop_instance_uid=hd.UID(),
                    instance_number=1,
                    manufacturer=SOFTWARE["Manufacturer"],
                    manufacturer_model_name=SOFTWARE["ManufacturerModelName"],
                    software_versions=SOFTWARE["SoftwareVersions"],
                    device_serial_number=SOFTWARE["DeviceSerialNumber"],
                    omit_empty_frames=False,
                )
    except (ValueError, AttributeError) as e:  # a source without what a SEG needs to reference it
        raise UserError(f"no DICOM SEG for {path.name}: {e}") from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def _item(**attributes):
    from pydicom.dataset import Dataset

    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value, meaning):
    return _item(CodeValue=value, CodingSchemeDesignator="DCM", CodeMeaning=meaning)


def _dimensions(organization):
    """A SEG of a cine loop's dimensions: its frames indexed by segment, then by time."""
    index = [
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=pointer,
            FunctionalGroupPointer=group,
            DimensionDescriptionLabel=label,
        )
        for pointer, group, label in (
            (0x0062000B, 0x0062000A, "Referenced Segment Number"),
            (0x00209128, 0x00209111, "Temporal Position Index"),
        )
    ]
    return [_item(DimensionOrganizationUID=organization)], index


def _per_frame(reference, segments, frames):
    """A SEG frame per segment and source frame, segment by segment: the source frame each derives from, its
    place in the dimensions and its segment."""
    purpose = _code("121322", "Source image for image processing operation")
    return [
        _item(
            DerivationImageSequence=[
                _item(
                    SourceImageSequence=[
                        _item(
                            **reference,
                            ReferencedFrameNumber=f + 1,
                            SpatialLocationsPreserved="YES",
                            PurposeOfReferenceCodeSequence=[purpose],
                        )
                    ],
                    DerivationCodeSequence=[_code("113076", "Segmentation")],
                )
            ],
            FrameContentSequence=[_item(DimensionIndexValues=[s + 1, f + 1], TemporalPositionIndex=f + 1)],
            SegmentIdentificationSequence=[_item(ReferencedSegmentNumber=s + 1)],
        )
        for s in range(segments)
        for f in range(frames)
    ]


def cine_seg(source, masks, names):
    """The binary SEG dataset of masks (frames, rows, cols, segments) on a multi-frame source without a frame of
    reference: a SEG frame per segment and source frame, segment by segment."""
    import highdicom as hd
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

    frames, rows, cols, segments = masks.shape
    if (rows, cols) != (source.Rows, source.Columns) or frames != int(source.NumberOfFrames):
        raise ValueError(f"masks of {frames} {cols}x{rows} frames for a source of {source.NumberOfFrames}")
    now = datetime.datetime.now()
    seg = _item(**{k: source.get(k, "") for k in PATIENT_AND_STUDY}, **SOFTWARE)
    seg.file_meta = FileMetaDataset()
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.Modality, seg.SeriesInstanceUID, seg.SeriesNumber, seg.InstanceNumber = "SEG", hd.UID(), SERIES_NUMBER, 1
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.ContentDate, seg.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    seg.InstanceCreationDate, seg.InstanceCreationTime = seg.ContentDate, seg.ContentTime
    seg.ContentLabel, seg.ContentDescription, seg.ContentCreatorName = "US_SEG", "", ""
    seg.SegmentationType, seg.SegmentsOverlap, seg.LossyImageCompression = "BINARY", "NO", "00"
    seg.SegmentSequence = segment_descriptions(names)
    reference = {"ReferencedSOPClassUID": source.SOPClassUID, "ReferencedSOPInstanceUID": source.SOPInstanceUID}
    seg.ReferencedSeriesSequence = [
        _item(SeriesInstanceUID=source.SeriesInstanceUID, ReferencedInstanceSequence=[_item(**reference)])
    ]
    seg.SourceImageSequence = [_item(**reference)]
    seg.DimensionOrganizationSequence, seg.DimensionIndexSequence = _dimensions(hd.UID())
    seg.SharedFunctionalGroupsSequence = [_item()]
    seg.PerFrameFunctionalGroupsSequence = _per_frame(reference, segments, frames)
    seg.SamplesPerPixel, seg.PhotometricInterpretation, seg.PresentationLUTShape = 1, "MONOCHROME2", "IDENTITY"
    seg.NumberOfFrames, seg.Rows, seg.Columns = frames * segments, rows, cols
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 1, 1, 0, 0
    seg.PixelData = pack_bits(np.moveaxis(masks, -1, 0).astype(np.uint8))  # segment by segment, frame by frame
    return seg
