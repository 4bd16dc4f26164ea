"""HA-independent engines: node stream link, proxy rules, broker client, proxy.

Nothing in this package imports ``homeassistant``; each module is tested on its
own against real sockets, a real Mosquitto and the node simulator.
"""
