"""DICOM edge: the SCP that receives images, the SC/SR outputs, and forwarding to a PACS."""
