"""The parts of ProcessPoolTaskRunner's backend (see taskrunner.processes):
the worker set (workers.py), the feeder (feeder.py), the receiver
(receiver.py), and the messages between this process and a worker
(wire.py)."""
