"""Small models trained on real images offline, and the quality metrics methods are judged by.

Submodules (imported on use; they need the ``testbed`` extra for data): ``data`` (digits, scenes,
photo crops and their writers), ``classifier`` (the shipped digit classifier), ``metrics`` (class
accuracy, PSNR / SSIM, per-layer attention error), ``models`` (``digits-unet`` / ``digits-dit``
definitions and the registry), ``evaluate`` (``diffattn evaluate``), ``commands`` (``diffattn testbed``).
"""
