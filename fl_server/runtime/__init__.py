"""Runtime: the launcher, our SuperLink, the Deployment Engine on loopback, certificates, progress events."""
