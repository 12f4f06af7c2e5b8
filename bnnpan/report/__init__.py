"""The report stage: tables and figures for every evaluated method.

Constants shared with the stage list live here (importing them does not load matplotlib).
"""

#: methods whose per-sub-band error energy the report draws (fp vs its plain-BNN twin vs BNNPan)
SUBBAND_METHODS = ("fp", "bnn", "bnnpan")
