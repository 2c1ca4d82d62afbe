"""fleetgate's own: runs tests of Eclipse Paho's client_test5.py (with the
suite's own MQTT 5 client) against 127.0.0.1:PORT, with every topic under
PREFIX (the suite's topics would be outside a fleetgate device's own).
usage: suite.py PORT PREFIX test_name..."""
import sys, os, unittest, logging
port, prefix = int(sys.argv[1]), sys.argv[2]
names = sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client_test5 as ct
def setData():
    ct.topics = [prefix + t for t in ["TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA"]]
    ct.wildtopics = [prefix + t for t in ["TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#"]]
    ct.nosubscribe_topics = ("test/nosubscribe",)
    ct.host = "127.0.0.1"
    ct.port = port
ct.setData = setData
# Its cleanup connects as ids fleetgate has no certificates for and
# subscribes to "#"; the server under test here is a new one.
ct.cleanup = lambda: None
logging.basicConfig(level=os.environ.get("LOG", "WARNING"))
r = unittest.TextTestRunner(verbosity=2).run(unittest.TestSuite([ct.Test(n) for n in names]))
sys.exit(0 if r.wasSuccessful() else 1)
