"""Fusion methods: classical references and (later) networks, behind one registry."""
