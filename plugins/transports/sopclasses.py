"""Which storage SOP classes to propose when the PACS will not say which a study holds.

C-GET needs a storage presentation context for the SOP class of every instance it will
receive, but some archives (DCMTK's dcmqrscp among them) return no SOP Class UID in an
IMAGE-level C-FIND. They do return the series' Modality, which narrows the candidates to a
handful; the rest of the common storage classes follow in later rounds, so an instance of an
unexpected class costs one more association instead of being silently dropped.
"""

from __future__ import annotations

from pydicom import uid as sc

_SECONDARY = (
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
)
_STRUCTURED_REPORTS = (
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.XRayRadiationDoseSRStorage,
)

BY_MODALITY: dict[str, tuple[str, ...]] = {
    "CT": (sc.CTImageStorage, sc.EnhancedCTImageStorage,
           sc.LegacyConvertedEnhancedCTImageStorage),
    "MR": (sc.MRImageStorage, sc.EnhancedMRImageStorage, sc.EnhancedMRColorImageStorage,
           sc.LegacyConvertedEnhancedMRImageStorage, sc.MRSpectroscopyStorage),
    "CR": (sc.ComputedRadiographyImageStorage,),
    "DX": (sc.DigitalXRayImageStorageForPresentation, sc.DigitalXRayImageStorageForProcessing),
    "MG": (sc.DigitalMammographyXRayImageStorageForPresentation,
           sc.DigitalMammographyXRayImageStorageForProcessing, sc.BreastTomosynthesisImageStorage),
    "US": (sc.UltrasoundImageStorage, sc.UltrasoundMultiFrameImageStorage),
    "NM": (sc.NuclearMedicineImageStorage,),
    "PT": (sc.PositronEmissionTomographyImageStorage, sc.EnhancedPETImageStorage,
           sc.LegacyConvertedEnhancedPETImageStorage),
    "XA": (sc.XRayAngiographicImageStorage, sc.EnhancedXAImageStorage),
    "RF": (sc.XRayRadiofluoroscopicImageStorage, sc.EnhancedXRFImageStorage),
    "OT": _SECONDARY,
    "SC": _SECONDARY,
    "SR": _STRUCTURED_REPORTS,
    "KO": (sc.KeyObjectSelectionDocumentStorage,),
    "PR": (sc.GrayscaleSoftcopyPresentationStateStorage,
           sc.ColorSoftcopyPresentationStateStorage),
    "DOC": (sc.EncapsulatedPDFStorage,),
    "SEG": (sc.SegmentationStorage,),
    "RTIMAGE": (sc.RTImageStorage,),
    "RTDOSE": (sc.RTDoseStorage,),
    "RTSTRUCT": (sc.RTStructureSetStorage,),
    "RTPLAN": (sc.RTPlanStorage, sc.RTIonPlanStorage),
    "XC": (sc.VLPhotographicImageStorage,),
    "ES": (sc.VLEndoscopicImageStorage,),
    "OP": (sc.OphthalmicPhotography8BitImageStorage,),
}
"""Modality (0008,0060) -> the storage SOP classes its series usually hold, likeliest first."""


def candidate_classes(modality: str | None) -> list[str]:
    """Every known storage class, those usual for *modality* first, then the rest.

    Secondary capture and structured reports follow the modality's own classes because
    nearly any series may carry a screenshot or a report.
    """
    ordered: list[str] = []
    first = BY_MODALITY.get((modality or "").strip().upper(), ())
    for uid in (*first, *_SECONDARY, *_STRUCTURED_REPORTS,
                *(uid for group in BY_MODALITY.values() for uid in group)):
        if uid not in ordered:
            ordered.append(uid)
    return ordered
