import os

# Tests make their own data and never reach the network.
os.environ.setdefault("YOLO_OFFLINE", "1")
