module twokey.test/tilecheck

go 1.19

require twokey.test/notecheck v0.0.0

replace twokey.test/notecheck => ../notecheck
