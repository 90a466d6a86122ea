module twokey.test/notecheck

go 1.19
