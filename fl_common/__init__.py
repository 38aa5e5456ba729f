"""What the server and the clients share: the wire protocol (record and metric
keys, the client seed, the declined flag), the update codec, the fault plan,
DP-SGD's config keys and the cost model. Server and client code never import
each other; they meet only through Flower messages and this package."""
