"""The Node-RED peer of issue 19, copied from the peer package (README.md); its Python parts are stdlib only."""
