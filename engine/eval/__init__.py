"""Layer 4: evaluation. Images from an exported network (a teacher's ODE solve or a flow map's jumps), PNG
grids, the Fréchet distance in the digits CNN's features with its data floor, and loss plots.
"""
