"""FHIR R4 delivery of AI reports to the EHR (SMART Backend Services, EHR profiles).

Modules: ``settings`` (FhirSettings), ``profiles`` (generic-r4, epic, oracle-health),
``resources`` (Bundle/Observation/DiagnosticReport builders), ``pdf`` (the human
report), ``auth`` (SmartBackendAuth, jwks), ``client`` (FhirClient), ``errors``
(the exception tree), ``channel`` (FhirChannel: prepare + deliver).
Import the submodules directly; this package module stays light on purpose.
"""
