"""Top-level test configuration: real-peer fixtures shared by every test area."""

pytest_plugins = ["tests.peers.orthanc", "tests.peers.postgres", "tests.integration.fhir.peer", "tests.peers.oidc"]
